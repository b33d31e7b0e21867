//! `…/credits/charges` (draw-down order, refusals, overage, idempotency, feature restrictions)
//! and `…/credits/adjustments` (both signs, Idempotency-Key).

mod support;

use serde_json::{json, Value};
use support::{customer_path, grant_body, summary, Backend, Ledger, TestDb};

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_owned()
}

fn charge_body(amount: &str, key: &str, extra: Value) -> Value {
    support::merged(json!({"amount": amount, "currency": "USD", "settlement_mode": "credit_only", "key": key}), extra)
}

async fn charge_ok(ledger: &Ledger, customer: &str, body: Value) -> Value {
    let (status, reply) = ledger.charge_with(customer, body).await;
    assert_eq!(status, 201, "{reply}");
    reply
}

fn consumed(pairs: &[(&Value, &str)]) -> Value {
    Value::Array(pairs.iter().map(|(g, a)| json!({"grant_id": id_of(g), "amount": a})).collect())
}

fn row(t: &str, amount: &str, grant: &str, before: &str, after: &str) -> (String, String, String, String, String) {
    (t.into(), amount.into(), grant.into(), before.into(), after.into())
}

async fn draw_down_follows_the_worked_examples(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;

    // A(p1, T10, 50), B(p1, T20, 80), C(p2, never, 100); created in reverse so that creation
    // order alone cannot explain the result.
    let c = ledger.customer("example-one").await;
    let gc = ledger.grant(&c, grant_body("100", json!({"name": "C", "priority": 2}))).await;
    let gb = ledger.grant(&c, grant_body("80", json!({"name": "B", "priority": 1, "expires_after": "P20D"}))).await;
    let ga = ledger.grant(&c, grant_body("50", json!({"name": "A", "priority": 1, "expires_after": "P10D"}))).await;
    let first = charge_ok(&ledger, &c, charge_body("90", "ex1", json!({}))).await;
    assert_eq!(first["consumed"], consumed(&[(&ga, "50"), (&gb, "40")]));
    assert_eq!(first["overage"], "0");
    assert_eq!(first["balance"], json!({"currency": "USD", "settled": "140", "live": "140"}));
    assert_eq!(first["amount"], "90");
    assert_eq!(first["currency"], "USD");
    assert_eq!(first["settlement_mode"], "credit_only");
    assert_eq!(first["key"], "ex1");
    assert_eq!(first["customer_id"], json!(c));
    assert_eq!(first["labels"], json!({}));
    assert!(first.get("feature_key").is_none(), "{first}");
    assert!(ledger::api::request::ulid_param("id", &id_of(&first)).is_ok());
    let history = ledger.all_transactions(&c).await;
    assert_eq!(
        summary(&history[..2]),
        vec![row("consumed", "-40", &id_of(&gb), "180", "140"), row("consumed", "-50", &id_of(&ga), "230", "180")],
        "one consumed movement per grant drawn from"
    );
    let second = charge_ok(&ledger, &c, charge_body("100", "ex1-b", json!({}))).await;
    assert_eq!(second["consumed"], consumed(&[(&gb, "40"), (&gc, "60")]));
    assert_eq!(second["balance"]["settled"], "40");

    // A(p1, T10, 100), B(p1, T20, 100), C(p2, never, 100), charge 150 → all of A, 50 of B.
    let c2 = ledger.customer("example-two").await;
    let ga = ledger.grant(&c2, grant_body("100", json!({"priority": 1, "expires_after": "P10D"}))).await;
    let gb = ledger.grant(&c2, grant_body("100", json!({"priority": 1, "expires_after": "P20D"}))).await;
    let _gc = ledger.grant(&c2, grant_body("100", json!({"priority": 2}))).await;
    let charged = charge_ok(&ledger, &c2, charge_body("150", "ex2", json!({}))).await;
    assert_eq!(charged["consumed"], consumed(&[(&ga, "100"), (&gb, "50")]));
    assert_eq!(charged["balance"]["settled"], "150");

    // Same priority: expiring before never-expiring, then creation order.
    let c3 = ledger.customer("ties").await;
    let z = ledger.grant(&c3, grant_body("10", json!({"priority": 5}))).await;
    let w = ledger.grant(&c3, grant_body("10", json!({"priority": 5, "expires_after": "P365D"}))).await;
    let x = ledger.grant(&c3, grant_body("10", json!({"priority": 5}))).await;
    let charged = charge_ok(&ledger, &c3, charge_body("25", "ties", json!({}))).await;
    assert_eq!(charged["consumed"], consumed(&[(&w, "10"), (&z, "10"), (&x, "5")]));
    assert_eq!(charged["balance"]["settled"], "5");
    ledger.assert_journal_sound().await;
}

async fn credit_only_charge_that_is_not_covered_is_refused_and_books_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("short").await;
    let open = ledger.grant(&c, grant_body("10", json!({}))).await;
    ledger.grant(&c, grant_body("5", json!({"filters": {"features": ["tokens"]}}))).await;
    let before = ledger.snapshot(&c).await;

    let reply = ledger
        .call(reqwest::Method::POST, &format!("{}/credits/charges", customer_path(&c)))
        .json(&charge_body("10.01", "too-much", json!({})))
        .send()
        .await;
    reply.assert_problem(402, None);
    assert_eq!(reply.body["customer_id"], json!(c));
    assert_eq!(reply.body["currency"], "USD");
    assert_eq!(reply.body["price"], "10.01");
    assert_eq!(reply.body["available"], "10", "restricted credit cannot pay a charge without a feature");
    // With the feature, the restricted credit counts too.
    let (status, body) =
        ledger.charge_with(&c, charge_body("15.01", "too-much-tokens", json!({"feature_key": "tokens"}))).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!((body["price"].as_str(), body["available"].as_str()), (Some("15.01"), Some("15")));
    assert_eq!(ledger.snapshot(&c).await, before, "a refused charge books nothing");

    let paid = charge_ok(&ledger, &c, charge_body("10", "exact", json!({}))).await;
    assert_eq!(paid["consumed"], consumed(&[(&open, "10")]));
    assert_eq!(paid["balance"], json!({"currency": "USD", "settled": "5", "live": "5"}));
    let (status, body) = ledger.charge(&c, "0.01", "nothing-left").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["available"], "0");
    // A currency the customer has no credit in.
    let (status, body) = ledger.charge_with(&c, charge_body("1", "euros", json!({"currency": "EUR"}))).await;
    assert_eq!(status, 402, "{body}");
    assert_eq!((body["currency"].as_str(), body["available"].as_str()), (Some("EUR"), Some("0")));
    // A refused charge is not remembered: after a top-up the same key goes through.
    ledger.grant(&c, grant_body("1", json!({}))).await;
    let (status, body) = ledger.charge(&c, "0.01", "nothing-left").await;
    // (The balance counts the 5 of restricted credit too.)
    assert_eq!((status, body["balance"]["live"].as_str()), (201, Some("5.99")), "{body}");
    ledger.assert_journal_sound().await;
}

async fn credit_then_invoice_consumes_what_there_is_and_records_overage(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("overage").await;
    let g = ledger.grant(&c, grant_body("100", json!({}))).await;
    let cti = json!({"settlement_mode": "credit_then_invoice"});
    let first = charge_ok(&ledger, &c, charge_body("150", "o1", cti.clone())).await;
    assert_eq!(first["consumed"], consumed(&[(&g, "100")]));
    assert_eq!(first["overage"], "50");
    assert_eq!(first["settlement_mode"], "credit_then_invoice");
    assert_eq!(first["balance"], json!({"currency": "USD", "settled": "0", "live": "0"}));
    let second = charge_ok(&ledger, &c, charge_body("5", "o2", cti.clone())).await;
    assert_eq!(second["consumed"], json!([]));
    assert_eq!(second["overage"], "5");
    assert_eq!(second["balance"]["settled"], "0", "overage never makes the credit balance negative");
    let history = ledger.all_transactions(&c).await;
    assert_eq!(
        summary(&history),
        vec![row("consumed", "-100", &id_of(&g), "100", "0"), row("funded", "100", &id_of(&g), "0", "100")]
    );
    assert_eq!(ledger.row_counts().await["overages"], 2);
    let (status, _) = ledger.charge(&c, "1", "credit-only").await;
    assert_eq!(status, 402);

    let g2 = ledger.grant(&c, grant_body("20", json!({}))).await;
    let covered = charge_ok(&ledger, &c, charge_body("5", "o3", cti)).await;
    assert_eq!(covered["consumed"], consumed(&[(&g2, "5")]));
    assert_eq!(covered["overage"], "0");
    assert_eq!(covered["balance"]["settled"], "15");
    ledger.assert_journal_sound().await;
}

async fn a_retried_charge_returns_the_original_answer_and_books_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("retrier").await;
    let g = ledger.grant(&c, grant_body("100", json!({}))).await;
    let body = charge_body(
        "7.50",
        "k1",
        json!({"name": "API call", "description": "GET /things", "labels": {"call": "c1"}, "feature_key": "api_requests"}),
    );
    let original = charge_ok(&ledger, &c, body.clone()).await;
    assert_eq!(original["amount"], "7.50");
    assert_eq!(original["consumed"], consumed(&[(&g, "7.50")]));
    assert_eq!(original["balance"]["settled"], "92.50");
    assert_eq!(original["labels"], json!({"call": "c1"}));
    assert_eq!(original["feature_key"], "api_requests");
    let before = ledger.snapshot(&c).await;

    let retried = charge_ok(&ledger, &c, body.clone()).await;
    assert_eq!(retried, original, "the very same answer, id and time included");
    assert_eq!(ledger.snapshot(&c).await, before, "a retry books nothing");

    for changed in [
        json!({"amount": "7.5"}),
        json!({"amount": "8"}),
        json!({"labels": {"call": "c2"}}),
        json!({"settlement_mode": "credit_then_invoice"}),
        json!({"feature_key": null}),
        json!({"currency": "EUR"}),
    ] {
        let reply = ledger
            .call(reqwest::Method::POST, &format!("{}/credits/charges", customer_path(&c)))
            .json(&support::merged(body.clone(), changed.clone()))
            .send()
            .await;
        reply.assert_problem(409, Some("key"));
    }
    assert_eq!(ledger.snapshot(&c).await, before, "a conflicting key books nothing");

    // Keys are per customer; a new key is a new charge.
    let other = ledger.customer("other").await;
    ledger.grant(&other, grant_body("10", json!({}))).await;
    let theirs = charge_ok(&ledger, &other, body.clone()).await;
    assert_ne!(theirs["id"], original["id"]);
    let next = charge_ok(&ledger, &c, support::merged(body, json!({"key": "k2"}))).await;
    assert_ne!(next["id"], original["id"]);
    assert_eq!(next["balance"]["settled"], "85.00");

    let history = ledger.all_transactions(&c).await;
    assert_eq!(history.len(), 3);
    let movement = &history[1];
    assert_eq!(movement["name"], "API call");
    assert_eq!(movement["description"], "GET /things");
    assert_eq!(movement["labels"], json!({"call": "c1"}));
    assert_eq!(movement["feature_key"], "api_requests");
    assert_eq!(movement["amount"], "-7.50");
    ledger.assert_journal_sound().await;
}

async fn charges_respect_feature_restrictions(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("features").await;
    let u = ledger.grant(&c, grant_body("10", json!({"priority": 5}))).await;
    let r = ledger.grant(&c, grant_body("20", json!({"priority": 1, "filters": {"features": ["api_requests"]}}))).await;
    let t = ledger.grant(&c, grant_body("30", json!({"priority": 1, "filters": {"features": ["tokens"]}}))).await;

    let api = charge_ok(&ledger, &c, charge_body("25", "api", json!({"feature_key": "api_requests"}))).await;
    assert_eq!(api["consumed"], consumed(&[(&r, "20"), (&u, "5")]));
    assert_eq!(api["balance"]["settled"], "35");
    let (status, body) = ledger.charge(&c, "6", "plain").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["available"], "5");
    let tokens = charge_ok(&ledger, &c, charge_body("31", "tokens", json!({"feature_key": "tokens"}))).await;
    assert_eq!(tokens["consumed"], consumed(&[(&t, "30"), (&u, "1")]));
    assert_eq!(tokens["balance"]["settled"], "4");
    for feature in ["api_requests", "tokens", "images"] {
        let (settled, _, _) = ledger.balance(&c, &format!("?filter[feature_key][eq]={feature}")).await;
        assert_eq!(settled, "4", "{feature}: only the unrestricted remainder is left");
    }
    let features: Vec<Value> = ledger.all_transactions(&c).await.iter().map(|t| t["feature_key"].clone()).collect();
    assert_eq!(
        features,
        vec![
            json!("tokens"),
            json!("tokens"),
            json!("api_requests"),
            json!("api_requests"),
            Value::Null,
            Value::Null,
            Value::Null
        ]
    );
    ledger.assert_journal_sound().await;
}

async fn adjustments_add_and_remove_credit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("adjusted").await;
    let g = ledger.grant(&c, grant_body("10", json!({}))).await;
    let added = ledger
        .adjust(&c, json!({"name": "Goodwill", "currency": "USD", "amount": "5.25", "labels": {"ticket": "t-1"}}))
        .await;
    assert_eq!(added, json!({"name": "Goodwill", "labels": {"ticket": "t-1"}}));
    assert_eq!(ledger.balance(&c, "").await, ("15.25".into(), "15.25".into(), "0".into()));
    let history = ledger.all_transactions(&c).await;
    let credit = &history[0];
    assert_eq!((credit["type"].as_str(), credit["amount"].as_str()), (Some("funded"), Some("5.25")));
    assert_eq!(credit["name"], "Goodwill");
    assert_eq!(credit["labels"], json!({"ticket": "t-1"}));
    assert_eq!(credit["available_balance"], json!({"before": "10", "after": "15.25"}));
    let adjustment_grant =
        credit["grant_id"].as_str().expect("an adjustment is credit with a place in the order").to_owned();
    assert_ne!(adjustment_grant, id_of(&g));

    let removed = ledger
        .adjust(&c, json!({"name": "Correction", "description": "double counted", "currency": "USD", "amount": "-3"}))
        .await;
    assert_eq!(removed, json!({"name": "Correction", "description": "double counted", "labels": {}}));
    assert_eq!(ledger.balance(&c, "").await.0, "12.25");
    let history = ledger.all_transactions(&c).await;
    assert_eq!(summary(&history[..1]), vec![row("consumed", "-3", &id_of(&g), "15.25", "12.25")]);
    assert_eq!(history[0]["description"], "double counted");

    // Another currency is another balance.
    ledger.adjust(&c, json!({"name": "Euros", "currency": "EUR", "amount": "2"})).await;
    let balances = ledger.balances(&c, "").await;
    assert_eq!(
        balances,
        json!([{"currency": "EUR", "settled": "2", "live": "2", "pending": "0"},
            {"currency": "USD", "settled": "12.25", "live": "12.25", "pending": "0"}])
    );

    // Removing more than there is leaves a negative balance (nothing is dropped) ...
    ledger.adjust(&c, json!({"name": "Big fix", "currency": "USD", "amount": "-20"})).await;
    assert_eq!(ledger.balance(&c, "?filter[currency][eq]=USD").await.0, "-7.75");
    let history = ledger.all_transactions(&c).await;
    assert_eq!(
        summary(&history[..3]),
        vec![
            row("consumed", "-7.75", "-", "0.00", "-7.75"),
            row("consumed", "-5.25", &adjustment_grant, "5.25", "0.00"),
            row("consumed", "-7", &id_of(&g), "12.25", "5.25"),
        ]
    );
    // ... which the next credit covers first.
    ledger.grant(&c, grant_body("10", json!({}))).await;
    assert_eq!(ledger.balance(&c, "?filter[currency][eq]=USD").await.0, "2.25");

    // A correction of zero is valid by the schema: answered 201, and it books nothing.
    let before = ledger.snapshot(&c).await;
    let reply = ledger
        .call(reqwest::Method::POST, &format!("{}/credits/adjustments", customer_path(&c)))
        .json(&json!({"name": "Nothing", "currency": "USD", "amount": "0"}))
        .send()
        .await;
    assert_eq!((reply.status, &reply.body["name"]), (201, &json!("Nothing")), "{}", reply.body);
    assert_eq!(ledger.snapshot(&c).await, before);
    ledger.assert_journal_sound().await;
}

async fn adjustment_idempotency_key_books_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("careful").await;
    ledger.grant(&c, grant_body("10", json!({}))).await;
    let path = format!("{}/credits/adjustments", customer_path(&c));
    let body = json!({"name": "Refund", "currency": "USD", "amount": "2"});
    let send = |key: &'static str, body: Value| {
        let call = ledger.call(reqwest::Method::POST, &path).header("Idempotency-Key", key).json(&body);
        call.send()
    };
    let first = send("adj-1", body.clone()).await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.body, json!({"name": "Refund", "labels": {}}));
    let before = ledger.snapshot(&c).await;
    assert_eq!(ledger.balance(&c, "").await.0, "12");

    let retried = send("adj-1", body.clone()).await;
    assert_eq!((retried.status, &retried.body), (201, &first.body));
    assert_eq!(ledger.snapshot(&c).await, before, "a retry books nothing");
    let conflict = send("adj-1", json!({"name": "Refund", "currency": "USD", "amount": "3"})).await;
    conflict.assert_problem(409, Some("Idempotency-Key"));
    let conflict = send("adj-1", json!({"name": "Refund", "currency": "USD", "amount": "-2"})).await;
    conflict.assert_problem(409, Some("Idempotency-Key"));
    let empty = send("", body.clone()).await;
    empty.assert_problem(400, Some("Idempotency-Key"));
    assert_eq!(ledger.snapshot(&c).await, before, "conflicts book nothing");

    // Without a key every request is a new adjustment; keys are per customer.
    ledger.adjust(&c, body.clone()).await;
    ledger.adjust(&c, body.clone()).await;
    assert_eq!(ledger.balance(&c, "").await.0, "16");
    let other = ledger.customer("other").await;
    let reply = ledger
        .call(reqwest::Method::POST, &format!("{}/credits/adjustments", customer_path(&other)))
        .header("Idempotency-Key", "adj-1")
        .json(&body)
        .send()
        .await;
    assert_eq!(reply.status, 201, "{}", reply.body);
    assert_eq!(ledger.balance(&other, "").await.0, "2");
    ledger.assert_journal_sound().await;
}

on_both_backends!(
    draw_down_follows_the_worked_examples,
    credit_only_charge_that_is_not_covered_is_refused_and_books_nothing,
    credit_then_invoice_consumes_what_there_is_and_records_overage,
    a_retried_charge_returns_the_original_answer_and_books_nothing,
    charges_respect_feature_restrictions,
    adjustments_add_and_remove_credit,
    adjustment_idempotency_key_books_once,
);
