//! Konnect's shapes and inputs, strictly: transactions carry only Konnect's members unless the
//! extensions are asked for; schema-valid filters and sorts are accepted.

mod support;

use serde_json::{json, Value};
use support::{column, customer_path, grant_body, Backend, Ledger, TestDb};

/// The members Konnect's `BillingCreditTransaction` allows (`additionalProperties: false`).
const TRANSACTION_MEMBERS: &[&str] = &[
    "id",
    "name",
    "description",
    "labels",
    "created_at",
    "booked_at",
    "type",
    "currency",
    "amount",
    "available_balance",
];

async fn transactions_have_konnect_members_unless_extensions_are_asked_for(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("shapes").await;
    ledger.grant(&c, grant_body("10", json!({"filters": {"features": ["tokens"]}}))).await;
    let (status, body) = ledger
        .charge_with(&c, json!({"amount": "1", "currency": "USD", "settlement_mode": "credit_only", "key": "k", "feature_key": "tokens"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, plain) = ledger.get(&format!("{}/credits/transactions", customer_path(&c))).await;
    assert_eq!(status, 200, "{plain}");
    for item in plain["data"].as_array().expect("data") {
        let members: Vec<&String> = item.as_object().expect("object").keys().collect();
        assert!(members.iter().all(|m| TRANSACTION_MEMBERS.contains(&m.as_str())), "{item}");
    }
    let extended = ledger.transactions(&c, "").await;
    assert_eq!(extended["data"][0]["feature_key"], "tokens");
    assert!(extended["data"][0]["grant_id"].is_string());
    let reply = ledger
        .call(reqwest::Method::GET, &format!("{}/credits/transactions?extensions=yes", customer_path(&c)))
        .send()
        .await;
    reply.assert_problem(400, Some("extensions"));
}

async fn schema_valid_filters_and_sorts_are_accepted(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("filtered").await;
    ledger.grant(&c, grant_body("10", json!({}))).await;
    for query in [
        "?sort=created_at%20desc",
        "?filter[name][eq]=filtered&filter[name][contains]=filt",
        "?filter[primary_email][neq]=x@example.com",
        "?filter[plan_key][neq]=gold",
        "?filter[billing_profile_id][neq]=01ARZ3NDEKTSV4RRFFQ69G5FAV",
    ] {
        let (status, body) = ledger.get(&format!("/v3/openmeter/customers{query}")).await;
        assert_eq!((status, column(&body, "key")), (200, vec!["filtered".to_owned()]), "{query}: {body}");
    }
    for query in ["?filter[plan_key]=gold", "?filter[billing_profile_id][eq]=01ARZ3NDEKTSV4RRFFQ69G5FAV"] {
        let (status, body) = ledger.get(&format!("/v3/openmeter/customers{query}")).await;
        assert_eq!((status, body["meta"]["page"]["total"].clone()), (200, json!(0)), "{query}: {body}");
    }
    // Any text is a schema-valid filter value: one that is no currency or feature matches nothing.
    let balances = ledger.balances(&c, "?filter[currency][eq]=usd").await;
    assert_eq!(balances, json!([]));
    let balances = ledger.balances(&c, "?filter[feature_key][eq]=Not-A-Key&filter[feature_key][neq]=x").await;
    assert_eq!(balances[0]["settled"], "10", "unrestricted credit counts for any feature: {balances}");
}

fn event(id: &str, time: &str) -> Value {
    json!({"id": id, "source": "s", "specversion": "1.0", "type": "t", "subject": "sorted-subject", "time": time})
}

async fn events_are_sorted_by_time_unless_asked_otherwise(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("sorted").await;
    // Ingested in this order, happened in another.
    for (id, time) in [("b", "2030-01-02T00:00:00Z"), ("c", "2030-01-03T00:00:00Z"), ("a", "2030-01-01T00:00:00Z")] {
        let reply = ledger.call(reqwest::Method::POST, "/v3/openmeter/events").json(&event(id, time)).send().await;
        assert_eq!(reply.status, 202, "{}", reply.text);
    }
    let ids = |body: &Value| {
        body["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|e| e["event"]["id"].as_str().unwrap_or("?").to_owned())
            .collect::<Vec<_>>()
    };
    for (query, expected) in [
        ("", ["c", "b", "a"]),
        ("?sort=time", ["c", "b", "a"]),
        ("?sort=time%20asc", ["a", "b", "c"]),
        ("?sort=ingested_at", ["a", "c", "b"]),
        ("?sort=stored_at%20asc", ["b", "c", "a"]),
    ] {
        let (status, body) = ledger.get(&format!("/v3/openmeter/events{query}")).await;
        assert_eq!((status, ids(&body)), (200, expected.map(String::from).to_vec()), "{query}");
    }
    // Cursor pages follow the order both ways.
    let (_, first) = ledger.get("/v3/openmeter/events?sort=time%20asc&page[size]=2").await;
    assert_eq!(ids(&first), ["a", "b"]);
    let (_, second) = ledger.get(first["meta"]["page"]["next"].as_str().expect("next")).await;
    assert_eq!(ids(&second), ["c"]);
    let (_, back) = ledger.get(second["meta"]["page"]["previous"].as_str().expect("previous")).await;
    assert_eq!(ids(&back), ["a", "b"]);
    for (query, expected) in [
        (format!("?filter[customer_id]={c}"), vec!["c", "b", "a"]),
        (format!("?filter[customer_id][neq]={c}"), vec![]),
        ("?filter[time][gte]=2030-01-02T00:00:00Z".to_owned(), vec!["c", "b"]),
        ("?filter[time]=2030-01-01T00:00:00Z".to_owned(), vec!["a"]),
        ("?filter[ingested_at][lt]=2000-01-01T00:00:00Z".to_owned(), vec![]),
    ] {
        let (status, body) = ledger.get(&format!("/v3/openmeter/events{query}")).await;
        assert_eq!((status, ids(&body)), (200, expected.iter().map(|s| s.to_string()).collect::<Vec<_>>()), "{query}");
    }
    for (query, field) in [
        ("?sort=size", "sort"),
        ("?filter[time][after]=2030-01-01T00:00:00Z", "filter[time][after]"),
        ("?filter[customer_id]=x", "filter[customer_id]"),
    ] {
        ledger
            .call(reqwest::Method::GET, &format!("/v3/openmeter/events{query}"))
            .send()
            .await
            .assert_problem(400, Some(field));
    }
}

/// Inputs at the schema's edges: what it calls valid is accepted (an empty events batch, empty
/// cursors and filter objects, a zero-sized page), what it calls invalid is a 400 naming the field
/// (`null` where a member is not nullable, a ULID filter value that is no ULID, a tax code that is
/// no ULID, a `dataschema` that is no absolute URI).
async fn schema_edges_are_judged_as_the_schema_says(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("edges").await;
    let rows = ledger.row_counts().await;
    for content_type in ["application/cloudevents-batch+json", "application/json"] {
        let reply =
            ledger.call(reqwest::Method::POST, "/v3/openmeter/events").body(Some(content_type), "[]").send().await;
        assert_eq!(reply.status, 202, "{content_type}: {}", reply.text);
    }
    assert_eq!(ledger.row_counts().await, rows, "an empty batch stores nothing");
    for path in [
        format!("{}/credits/transactions?page[after]=&page[before]=&page[size]=0", customer_path(&c)),
        "/v3/openmeter/events?filter[customer_id]=&page[size]=0".to_owned(),
        "/v3/openmeter/customers?filter[billing_profile_id]=&filter[billing_profile_id][oeq]=x".to_owned(),
    ] {
        let (status, body) = ledger.get(&path).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // (Built member by member: `merged` drops a null member.)
    let with_null = |base: Value, member: &str| {
        let mut body = base;
        body[member] = Value::Null;
        body
    };
    for (body, field) in [
        (json!({"name": "n", "key": "k2", "billing_address": {"phone_number": null}}), "billing_address.phone_number"),
        (with_null(json!({"name": "n", "key": "k2"}), "primary_email"), "primary_email"),
        (with_null(json!({"name": "n", "key": "k2"}), "description"), "description"),
    ] {
        let reply = ledger.call(reqwest::Method::POST, "/v3/openmeter/customers").json(&body).send().await;
        reply.assert_problem(400, Some(field));
    }
    let reply = ledger.call(reqwest::Method::GET, "/v3/openmeter/customers?filter[billing_profile_id]=0").send().await;
    reply.assert_problem(400, Some("filter[billing_profile_id]"));
    let grants = format!("{}/credits/grants", customer_path(&c));
    for (body, field) in [
        (with_null(grant_body("1", json!({})), "tax_config"), "tax_config"),
        (grant_body("1", json!({"tax_config": "inclusive"})), "tax_config"),
        (grant_body("1", json!({"tax_config": {"tax_code": {"id": "x"}}})), "tax_config.tax_code.id"),
        (grant_body("1", json!({"tax_config": {"behavior": "sometimes"}})), "tax_config.behavior"),
        (with_null(grant_body("1", json!({})), "priority"), "priority"),
    ] {
        let reply = ledger.call(reqwest::Method::POST, &grants).json(&body).send().await;
        reply.assert_problem(400, Some(field));
    }
    let granted = ledger.grant(&c, grant_body("1", json!({"tax_config": {"behavior": "exclusive"}}))).await;
    assert_eq!(granted["tax_config"], json!({"behavior": "exclusive"}));
    assert_eq!(ledger.check().await, Vec::<String>::new());
}

on_both_backends!(
    schema_edges_are_judged_as_the_schema_says,
    transactions_have_konnect_members_unless_extensions_are_asked_for,
    schema_valid_filters_and_sorts_are_accepted,
    events_are_sorted_by_time_unless_asked_otherwise,
);
