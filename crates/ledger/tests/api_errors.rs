//! Error paths across the API: every refusal is a 4xx `application/problem+json` with status,
//! title, detail and the offending field where one applies, and books nothing.

mod support;

use reqwest::Method;
use serde_json::{json, Value};
use support::{
    customer_path, grant_body, merged, protected_calls, subject_sync, usage_range, Backend, Ledger, ProtectedCall,
    TestDb, UNKNOWN_ID,
};

/// A customer with some credit, booked, so that "nothing changed" means something.
async fn funded_customer(ledger: &Ledger) -> (String, String) {
    let c = ledger.customer("victim").await;
    let g = ledger.grant(&c, grant_body("10", json!({"key": "existing"}))).await;
    let (status, body) = ledger.charge(&c, "2.50", "existing").await;
    assert_eq!(status, 201, "{body}");
    (c, g["id"].as_str().expect("id").to_owned())
}

fn charge_body(extra: Value) -> Value {
    merged(json!({"amount": "1", "currency": "USD", "settlement_mode": "credit_only", "key": "k"}), extra)
}

fn adjustment_body(extra: Value) -> Value {
    merged(json!({"name": "fix", "currency": "USD", "amount": "1"}), extra)
}

/// POSTs `body` to `path` and expects a 400 naming `field`.
async fn refused(ledger: &Ledger, path: &str, body: &Value, field: &str) {
    let reply = ledger.call(Method::POST, path).json(body).send().await;
    assert_eq!(reply.status, 400, "{body} → {}", reply.body);
    reply.assert_problem(400, Some(field));
}

async fn malformed_amounts_are_refused_and_book_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, _) = funded_customer(&ledger).await;
    let before = ledger.snapshot(&c).await;
    let grants = format!("{}/credits/grants", customer_path(&c));
    let charges = format!("{}/credits/charges", customer_path(&c));
    let adjustments = format!("{}/credits/adjustments", customer_path(&c));
    let malformed = [
        json!("1e3"),
        json!("1,5"),
        json!("NaN"),
        json!(""),
        json!("+1"),
        json!(".5"),
        json!("1."),
        json!(" 1"),
        json!(5),
        json!(null),
    ];
    for amount in malformed.iter().chain([&json!("-5"), &json!("0"), &json!("0.00")]) {
        refused(&ledger, &grants, &grant_body("x", json!({"amount": amount})), "amount").await;
        refused(&ledger, &charges, &charge_body(json!({"amount": amount})), "amount").await;
    }
    // (A zero adjustment is valid and books nothing: `api_charges.rs`.)
    for amount in &malformed {
        refused(&ledger, &adjustments, &adjustment_body(json!({"amount": amount})), "amount").await;
    }
    for basis in ["1e3", "0", "-1", "NaN"] {
        let body = grant_body(
            "10",
            json!({"funding_method": "invoice", "purchase": {"currency": "USD", "per_unit_cost_basis": basis}}),
        );
        refused(&ledger, &grants, &body, "purchase.per_unit_cost_basis").await;
    }
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked");
    ledger.assert_journal_sound().await;
}

async fn bad_currencies_priorities_durations_and_other_fields_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, _) = funded_customer(&ledger).await;
    let before = ledger.snapshot(&c).await;
    let grants = format!("{}/credits/grants", customer_path(&c));
    let charges = format!("{}/credits/charges", customer_path(&c));
    let adjustments = format!("{}/credits/adjustments", customer_path(&c));
    for currency in ["usd", "Usd", "US", "USDT", "U$D", "", "ÜSD"] {
        refused(&ledger, &grants, &grant_body("1", json!({"currency": currency})), "currency").await;
        refused(&ledger, &charges, &charge_body(json!({"currency": currency})), "currency").await;
        refused(&ledger, &adjustments, &adjustment_body(json!({"currency": currency})), "currency").await;
        let purchase = json!({"funding_method": "invoice", "purchase": {"currency": currency}});
        refused(&ledger, &grants, &grant_body("1", purchase), "purchase.currency").await;
    }
    for priority in [json!(0), json!(1001), json!(-1), json!(65537), json!(1.5), json!("10")] {
        refused(&ledger, &grants, &grant_body("1", json!({"priority": priority})), "priority").await;
    }
    for duration in ["P", "30D", "P1.5M", "PT", "P0D", "P1H", "PT1.H", "1 day", "P-1D", ""] {
        refused(&ledger, &grants, &grant_body("1", json!({"expires_after": duration})), "expires_after").await;
    }
    let grant_cases: Vec<(Value, &str)> = vec![
        (json!({"effective_at": "2000-01-01T00:00:00Z", "expires_after": "P1D"}), "expires_after"),
        (json!({"effective_at": "tomorrow"}), "effective_at"),
        (json!({"funding_method": "card"}), "funding_method"),
        (json!({"funding_method": "invoice"}), "purchase"),
        (json!({"funding_method": "external"}), "purchase"),
        (json!({"purchase": {"currency": "USD"}}), "purchase"),
        (
            json!({"purchase": {"currency": "USD", "availability_policy": "later"}, "funding_method": "invoice"}),
            "purchase.availability_policy",
        ),
        (json!({"filters": {"features": ["Bad Key"]}}), "filters.features[0]"),
        (json!({"filters": {"features": ["ok", "a__b"]}}), "filters.features[1]"),
        (json!({"name": ""}), "name"),
        (json!({"name": null}), "name"),
        (json!({"currency": null}), "currency"),
        (json!({"description": "d".repeat(1025)}), "description"),
        (json!({"key": ""}), "key"),
        (json!({"labels": {"_x": "y"}}), "labels._x"),
        (json!({"colour": "red"}), "colour"),
        (json!({"purchase": {"currency": "USD", "colour": "red"}, "funding_method": "invoice"}), "purchase.colour"),
        (json!({"filters": {"feature": ["tokens"]}}), "filters.feature"),
    ];
    for (extra, field) in grant_cases {
        refused(&ledger, &grants, &grant_body("1", extra), field).await;
    }
    let charge_cases: Vec<(Value, &str)> = vec![
        (json!({"feature_key": "Tokens"}), "feature_key"),
        (json!({"settlement_mode": "later"}), "settlement_mode"),
        (json!({"settlement_mode": null}), "settlement_mode"),
        (json!({"key": ""}), "key"),
        (json!({"key": null}), "key"),
        (json!({"key": "k".repeat(257)}), "key"),
        (json!({"name": ""}), "name"),
        (json!({"labels": {"a": ""}}), "labels.a"),
        (json!({"colour": "red"}), "colour"),
    ];
    for (extra, field) in charge_cases {
        refused(&ledger, &charges, &charge_body(extra), field).await;
    }
    for (extra, field) in [
        (json!({"name": ""}), "name"),
        (json!({"name": null}), "name"),
        (json!({"labels": {"kong-owned": "c"}}), "labels.kong-owned"),
        (json!({"grant_id": UNKNOWN_ID}), "grant_id"),
    ] {
        refused(&ledger, &adjustments, &adjustment_body(extra), field).await;
    }
    for bad in ["not json", "{", "[]", "null", ""] {
        for path in [&grants, &charges, &adjustments] {
            let reply = ledger.call(Method::POST, path).body(Some("application/json"), bad).send().await;
            reply.assert_problem(400, Some("body"));
        }
    }
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked");
    ledger.assert_journal_sound().await;
}

const BAD_IDS: [&str; 7] = [
    "not-a-ulid",
    "01arz3ndektsv4rrffq69g5fav",
    "01ARZ3NDEKTSV4RRFFQ69G5FA",
    "01ARZ3NDEKTSV4RRFFQ69G5FAVX",
    "01ARZ3NDEKTSV4RRFFQ69G5FAU",
    "81ARZ3NDEKTSV4RRFFQ69G5FAV",
    "01ARZ3NDEKTSV4RRFFQ69G5F%20",
];

async fn bad_ulids_in_paths_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, g) = funded_customer(&ledger).await;
    let before = ledger.snapshot(&c).await;
    let settle = json!({"status": "settled"});
    for bad in BAD_IDS {
        let customer = customer_path(bad);
        let calls: Vec<(Method, String, Option<Value>)> = vec![
            (Method::GET, customer.clone(), None),
            (Method::PUT, customer.clone(), Some(json!({"name": "n"}))),
            (Method::DELETE, customer.clone(), None),
            (Method::GET, format!("{customer}/credits/grants"), None),
            (Method::POST, format!("{customer}/credits/grants"), Some(grant_body("1", json!({})))),
            (Method::GET, format!("{customer}/credits/grants/{g}"), None),
            (Method::POST, format!("{customer}/credits/grants/{g}/settlement/external"), Some(settle.clone())),
            (Method::POST, format!("{customer}/credits/grants/{g}/void"), None),
            (Method::GET, format!("{customer}/credits/balance"), None),
            (Method::GET, format!("{customer}/credits/transactions"), None),
            (Method::POST, format!("{customer}/credits/adjustments"), Some(adjustment_body(json!({})))),
            (Method::POST, format!("{customer}/credits/charges"), Some(charge_body(json!({})))),
        ];
        for (method, path, body) in calls {
            let mut call = ledger.call(method.clone(), &path);
            if let Some(b) = &body {
                call = call.json(b);
            }
            let reply = call.send().await;
            reply.assert_problem(400, Some("customerId"));
            assert_eq!(reply.body["invalid_parameters"][0]["source"], "path", "{method} {path}");
        }
        let grant = format!("{}/credits/grants/{bad}", customer_path(&c));
        for (method, path, body) in [
            (Method::GET, grant.clone(), None),
            (Method::POST, format!("{grant}/settlement/external"), Some(settle.clone())),
            (Method::POST, format!("{grant}/void"), None),
        ] {
            let mut call = ledger.call(method.clone(), &path);
            if let Some(b) = &body {
                call = call.json(b);
            }
            let reply = call.send().await;
            reply.assert_problem(400, Some("creditGrantId"));
        }
    }
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked");
    ledger.assert_journal_sound().await;
}

async fn unknown_customers_and_grants_are_not_found(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, g) = funded_customer(&ledger).await;
    let other = ledger.customer("other").await;
    let others_grant = ledger.grant(&other, grant_body("3", json!({}))).await["id"].as_str().expect("id").to_owned();
    let gone = ledger.customer("gone").await;
    let gone_grant = ledger.grant(&gone, grant_body("3", json!({}))).await["id"].as_str().expect("id").to_owned();
    let (status, _) = ledger.delete(&customer_path(&gone)).await;
    assert_eq!(status, 204);
    let before = ledger.snapshot(&c).await;
    let rows = ledger.row_counts().await;
    let settle = json!({"status": "settled"});
    let customer_calls = |id: &str, grant: &str| -> Vec<(Method, String, Option<Value>)> {
        let customer = customer_path(id);
        vec![
            (Method::GET, format!("{customer}/credits/grants"), None),
            (Method::POST, format!("{customer}/credits/grants"), Some(grant_body("1", json!({})))),
            (Method::POST, format!("{customer}/credits/grants/{grant}/void"), None),
            (Method::GET, format!("{customer}/credits/balance"), None),
            (Method::GET, format!("{customer}/credits/transactions"), None),
            (Method::POST, format!("{customer}/credits/adjustments"), Some(adjustment_body(json!({})))),
            (Method::POST, format!("{customer}/credits/charges"), Some(charge_body(json!({})))),
        ]
    };
    let mut calls = customer_calls(UNKNOWN_ID, &g);
    calls.extend(customer_calls(&gone, &gone_grant));
    let unknown = customer_path(UNKNOWN_ID);
    calls.extend([
        (Method::GET, unknown.clone(), None),
        (Method::PUT, unknown.clone(), Some(json!({"name": "n"}))),
        (Method::DELETE, unknown.clone(), None),
        (Method::DELETE, customer_path(&gone), None),
        (Method::GET, format!("{unknown}/credits/grants/{g}"), None),
        (Method::POST, format!("{unknown}/credits/grants/{g}/settlement/external"), Some(settle.clone())),
    ]);
    // Unknown grants of a known customer, and another customer's grant through this one.
    for grant in [UNKNOWN_ID, &others_grant] {
        let path = format!("{}/credits/grants/{grant}", customer_path(&c));
        calls.extend([
            (Method::GET, path.clone(), None),
            (Method::POST, format!("{path}/settlement/external"), Some(settle.clone())),
            (Method::POST, format!("{path}/void"), None),
        ]);
    }
    for (method, path, body) in calls {
        let mut call = ledger.call(method.clone(), &path);
        if let Some(b) = &body {
            call = call.json(b);
        }
        let reply = call.send().await;
        assert_eq!(reply.status, 404, "{method} {path}: {}", reply.body);
        reply.assert_problem(404, None);
    }
    // Paths that name no endpoint at all.
    for path in ["/v3/openmeter/nothing", "/v3/openmeter/customers/x/y/z", "/v4/openmeter/customers", "/"] {
        let reply = ledger.call(Method::GET, path).send().await;
        reply.assert_problem(404, None);
    }
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked");
    assert_eq!(ledger.row_counts().await, rows, "nothing stored anywhere");
    let (_, others) = ledger.get(&format!("{}/credits/grants/{others_grant}", customer_path(&other))).await;
    assert_eq!(others["status"], "active", "the other customer's grant was not voided");
    ledger.assert_journal_sound().await;
}

async fn missing_or_wrong_tokens_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, g) = funded_customer(&ledger).await;
    let before = ledger.snapshot(&c).await;
    let wrong = [
        None,
        Some("Bearer wrong-token".to_owned()),
        Some(format!("Bearer {}x", support::TOKEN)),
        Some(format!("Bearer {}", &support::TOKEN[..support::TOKEN.len() - 1])),
        Some(format!("Basic {}", support::TOKEN)),
        Some(support::TOKEN.to_owned()),
        Some("Bearer ".to_owned()),
    ];
    for ProtectedCall { method, path, body, .. } in protected_calls(&c, &g) {
        for authorization in &wrong {
            let mut call = ledger.call_without_token(method.clone(), &path);
            if let Some(a) = authorization {
                call = call.header("authorization", a);
            }
            if let Some(b) = &body {
                call = call.json(b);
            }
            let reply = call.send().await;
            assert_eq!(reply.status, 401, "{method} {path} with {authorization:?}");
            reply.assert_problem(401, None);
            assert_eq!(reply.headers.get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
        }
    }
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked or stored");
    // The scheme is case-insensitive (RFC 7235), the token is not.
    for authorization in ["bearer test-token", "BEARER test-token"] {
        let reply = ledger
            .call_without_token(Method::GET, "/v3/openmeter/customers")
            .header("authorization", authorization)
            .send()
            .await;
        assert_eq!(reply.status, 200, "{authorization}: {}", reply.body);
    }
    let reply = ledger
        .call_without_token(Method::GET, "/v3/openmeter/customers")
        .header("authorization", "Bearer TEST-TOKEN")
        .send()
        .await;
    reply.assert_problem(401, None);
    // The open endpoints need no token.
    for path in ["/healthz", "/metrics", "/v3/openapi.json"] {
        let reply = ledger.call_without_token(Method::GET, path).send().await;
        assert_eq!(reply.status, 200, "{path}");
    }
    ledger.assert_journal_sound().await;
}

async fn wrong_content_types_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, g) = funded_customer(&ledger).await;
    let before = ledger.snapshot(&c).await;
    let with_bodies =
        protected_calls(&c, &g).into_iter().filter_map(|ProtectedCall { method: m, path: p, body: b, .. }| {
            let b = b?;
            // Voiding takes no body at all; events have their own content types (see api_events).
            (!p.ends_with("/void") && !p.ends_with("/events")).then_some((m, p, b))
        });
    for (method, path, body) in with_bodies {
        for content_type in
            [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("application/xml"), None]
        {
            let reply = ledger.call(method.clone(), &path).body(content_type, body.to_string()).send().await;
            // Konnect answers 400, not 415, naming the header.
            assert_eq!(reply.status, 400, "{method} {path} as {content_type:?}: {}", reply.body);
            reply.assert_problem(400, Some("Content-Type"));
            assert_eq!(reply.body["invalid_parameters"][0]["source"], "header");
        }
        // Structured JSON types and parameters are fine (the request may still be refused for
        // other reasons, never for its content type).
        let reply =
            ledger.call(method.clone(), &path).body(Some("application/json; charset=utf-8"), "{\"x\": 1}").send().await;
        assert_eq!(reply.status, 400, "{method} {path}: {}", reply.body);
    }
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked");
    ledger.assert_journal_sound().await;
}

async fn oversized_bodies_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, g) = funded_customer(&ledger).await;
    let before = ledger.snapshot(&c).await;
    let limit = ledger::api::request::DEFAULT_MAX_BODY_BYTES;
    assert_eq!(limit, 1 << 20);
    // A JSON object of exactly `size` bytes whose name is far too long. (One byte over the limit:
    // the server reads every byte before it refuses, so the client never writes into a closed
    // connection, which a far larger body would race with.)
    let body_of = |size: usize| {
        let padding = size - r#"{"name":""}"#.len();
        format!(r#"{{"name":"{}"}}"#, "x".repeat(padding))
    };
    assert_eq!(body_of(limit + 1).len(), limit + 1);
    let customer = customer_path(&c);
    let targets = [
        (Method::POST, "/v3/openmeter/customers".to_owned(), "application/json"),
        (Method::PUT, customer.clone(), "application/json"),
        (Method::POST, format!("{customer}/credits/grants"), "application/json"),
        (Method::POST, format!("{customer}/credits/grants/{g}/settlement/external"), "application/json"),
        (Method::POST, format!("{customer}/credits/adjustments"), "application/json"),
        (Method::POST, format!("{customer}/credits/charges"), "application/json"),
        (Method::POST, "/v3/openmeter/events".to_owned(), "application/cloudevents+json"),
    ];
    for (method, path, content_type) in &targets {
        let reply = ledger.call(method.clone(), path).body(Some(content_type), body_of(limit + 1)).send().await;
        assert_eq!(reply.status, 413, "{method} {path}");
        reply.assert_problem(413, None);
        // At the limit the body is read (and refused for what it says).
        let reply = ledger.call(method.clone(), path).body(Some(content_type), body_of(limit)).send().await;
        assert_eq!(reply.status, 400, "{method} {path} at the limit: {}", reply.body);
    }
    // Requests that would book, padded with JSON whitespace one byte past the limit: refused,
    // and nothing of them booked.
    let charge = charge_body(json!({"key": "oversized"}));
    let usage = usage_range(0, 3, "1.50", "credit_only");
    let sync = json!({"node": "node-big", "subjects": [subject_sync("victim-subject", json!({ "usage": usage }))]});
    let padded = |body: &Value| {
        let text = body.to_string();
        text.clone() + &" ".repeat(limit + 1 - text.len())
    };
    for (path, body) in [(format!("{customer}/credits/charges"), &charge), ("/v3/gateway/sync".to_owned(), &sync)] {
        let reply = ledger.call(Method::POST, &path).body(Some("application/json"), padded(body)).send().await;
        reply.assert_problem(413, None);
    }
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked or stored");
    // The same requests within the limit book: the refusal above is what kept them out.
    let (status, body) = ledger.charge_with(&c, charge).await;
    assert_eq!(status, 201, "{body}");
    let answer = ledger.sync_one("node-big", sync["subjects"][0].clone()).await;
    assert_eq!(answer["usage"], "booked", "{answer}");
    assert_eq!(ledger.balance(&c, "").await.0, "5.00", "10 granted, 2.50 + 1 charged, 1.50 of usage booked");
    ledger.assert_journal_sound().await;
}

async fn unknown_query_parameters_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, _) = funded_customer(&ledger).await;
    let customer = customer_path(&c);
    for (path, param) in [
        ("/v3/openmeter/customers".to_owned(), "foo"),
        (format!("{customer}/credits/grants"), "foo"),
        (format!("{customer}/credits/grants"), "sort"),
        (format!("{customer}/credits/balance"), "foo"),
        (format!("{customer}/credits/balance"), "filter[type]"),
        (format!("{customer}/credits/transactions"), "foo"),
        (format!("{customer}/credits/transactions"), "filter[grant_id]"),
        ("/v3/openmeter/events".to_owned(), "foo"),
        ("/v3/openmeter/events".to_owned(), "sort"),
    ] {
        let reply = ledger.call(Method::GET, &format!("{path}?{param}=1")).send().await;
        reply.assert_problem(400, Some(param));
        assert_eq!(reply.body["invalid_parameters"][0]["source"], "query", "{path}?{param}");
    }
    ledger.assert_journal_sound().await;
}

async fn unsupported_methods_are_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, g) = funded_customer(&ledger).await;
    let before = ledger.snapshot(&c).await;
    let customer = customer_path(&c);
    for (method, path, allow) in [
        (Method::DELETE, "/v3/openmeter/events".to_owned(), "POST,GET,HEAD"),
        (Method::PUT, "/v3/openmeter/customers".to_owned(), "POST,GET,HEAD"),
        (Method::PATCH, customer.clone(), "GET,HEAD,PUT,DELETE"),
        (Method::GET, format!("{customer}/credits/charges"), "POST"),
        (Method::DELETE, format!("{customer}/credits/grants/{g}"), "GET,HEAD"),
        (Method::GET, format!("{customer}/credits/grants/{g}/void"), "POST"),
        (Method::POST, format!("{customer}/credits/balance"), "GET,HEAD"),
        (Method::POST, "/healthz".to_owned(), "GET,HEAD"),
    ] {
        let reply = ledger.call(method.clone(), &path).json(&json!({})).send().await;
        assert_eq!(reply.status, 405, "{method} {path}");
        reply.assert_problem(405, None);
        assert_eq!(reply.headers.get("allow").and_then(|v| v.to_str().ok()), Some(allow), "{method} {path}");
    }
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked");
    ledger.assert_journal_sound().await;
}

on_both_backends!(
    unsupported_methods_are_refused,
    malformed_amounts_are_refused_and_book_nothing,
    bad_currencies_priorities_durations_and_other_fields_are_refused,
    bad_ulids_in_paths_are_refused,
    unknown_customers_and_grants_are_not_found,
    missing_or_wrong_tokens_are_refused,
    wrong_content_types_are_refused,
    oversized_bodies_are_refused,
    unknown_query_parameters_are_refused,
);
