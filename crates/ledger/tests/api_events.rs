//! `/v3/openmeter/events` (CloudEvents ingest in every accepted content type, duplicates,
//! listing) and the service endpoints: `/healthz`, `/metrics`, `/v3/openapi.json`.

mod support;

use serde_json::{json, Value};
use support::{data, Backend, Ledger, Reply, TestDb};

const EVENTS: &str = "/v3/openmeter/events";

fn event(id: &str, subject: &str) -> Value {
    json!({"id": id, "source": "gateway", "specversion": "1.0", "type": "request", "subject": subject,
        "time": "2026-01-01T00:00:00Z", "data": {"tokens": 5}})
}

async fn ingest(ledger: &Ledger, content_type: &str, body: &Value) -> Reply {
    ledger.call(reqwest::Method::POST, EVENTS).body(Some(content_type), body.to_string()).send().await
}

async fn ingest_ok(ledger: &Ledger, content_type: &str, body: &Value) {
    let reply = ingest(ledger, content_type, body).await;
    assert_eq!(reply.status, 202, "{content_type}: {}", reply.text);
    assert_eq!(reply.text, "");
}

async fn list(ledger: &Ledger, query: &str) -> Value {
    let (status, body) = ledger.get(&format!("{EVENTS}{query}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn event_ids(body: &Value) -> Vec<String> {
    data(body).iter().map(|e| e["event"]["id"].as_str().unwrap_or("?").to_owned()).collect()
}

async fn events_are_accepted_in_every_content_type_and_stored_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let customer = ledger.customer("acme").await;
    ingest_ok(&ledger, "application/cloudevents+json", &event("e1", "acme-subject")).await;
    ingest_ok(&ledger, "application/cloudevents-batch+json", &json!([event("e2", "acme-subject"), event("e3", "x")]))
        .await;
    ingest_ok(&ledger, "application/json", &event("e4", "x")).await;
    ingest_ok(&ledger, "application/json", &json!([event("e5", "x"), event("e6", "x")])).await;
    ingest_ok(&ledger, "application/json; charset=utf-8", &event("e7", "x")).await;
    let minimal = json!({"id": "e8", "source": "gateway", "specversion": "1.0", "type": "request", "subject": "x"});
    ingest_ok(&ledger, "application/cloudevents+json", &minimal).await;
    let counts = ledger.row_counts().await;
    assert_eq!(counts["events"], 8);

    // Duplicates by (source, id) are accepted and not stored again; the first one stays.
    let mut changed = event("e1", "acme-subject");
    changed["data"] = json!({"tokens": 999});
    ingest_ok(&ledger, "application/cloudevents+json", &changed).await;
    ingest_ok(&ledger, "application/cloudevents-batch+json", &json!([event("e2", "acme-subject"), event("e9", "x")]))
        .await;
    assert_eq!(ledger.row_counts().await["events"], 9);
    // The same id from another source is another event.
    let mut elsewhere = event("e1", "x");
    elsewhere["source"] = json!("billing");
    ingest_ok(&ledger, "application/json", &elsewhere).await;

    // By ingestion, newest first (the default order is by event time).
    let all = list(&ledger, "?sort=ingested_at").await;
    assert_eq!(event_ids(&all), vec!["e1", "e9", "e8", "e7", "e6", "e5", "e4", "e3", "e2", "e1"], "newest first");
    assert_eq!(data(&all)[0]["event"]["source"], "billing");
    assert!(all["meta"]["page"]["next"].is_null() && all["meta"]["page"]["previous"].is_null(), "{all}");
    let first = &data(&all)[9];
    assert_eq!(first["event"], event("e1", "acme-subject"), "stored exactly as first received");
    assert_eq!(first["customer"], json!({"id": customer}), "the subject belongs to the customer");
    support::parse_time(first["ingested_at"].as_str().unwrap_or(""));
    support::parse_time(first["stored_at"].as_str().unwrap_or(""));
    assert!(data(&all)[1].get("customer").is_none(), "subject x belongs to nobody");
    assert_eq!(data(&all)[2]["event"], minimal);

    let metrics = ledger.call_without_token(reqwest::Method::GET, "/metrics").send().await.text;
    assert!(metrics.contains("credits_ledger_events_stored_total 10\n"), "{metrics}");
    assert!(metrics.contains("credits_ledger_events_duplicate_total 2\n"), "{metrics}");
}

async fn events_list_pages_with_cursors_and_filters(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    for i in 1..=5 {
        let mut e = event(&format!("ev{i}"), if i % 2 == 1 { "s-a" } else { "s-b" });
        e["type"] = json!(if i % 2 == 1 { "request" } else { "response" });
        e["source"] = json!(format!("gw-{}", 1 + i % 2));
        ingest_ok(&ledger, "application/cloudevents+json", &e).await;
    }
    let first = list(&ledger, "?page[size]=2").await;
    assert_eq!(event_ids(&first), vec!["ev5", "ev4"]);
    assert_eq!(first["meta"]["page"]["size"], 2);
    assert!(first["meta"]["page"]["previous"].is_null(), "{first}");
    let next = first["meta"]["page"]["next"].as_str().expect("next").to_owned();
    assert!(next.starts_with("/v3/openmeter/events?"), "{next}");
    let second = list(&ledger, &next[EVENTS.len()..]).await;
    assert_eq!(event_ids(&second), vec!["ev3", "ev2"]);
    let third = list(&ledger, &second["meta"]["page"]["next"].as_str().expect("next")[EVENTS.len()..]).await;
    assert_eq!(event_ids(&third), vec!["ev1"]);
    assert!(third["meta"]["page"]["next"].is_null(), "{third}");
    // Back to the first page: it links onwards again, and nothing is newer.
    let back = list(&ledger, &second["meta"]["page"]["previous"].as_str().expect("previous")[EVENTS.len()..]).await;
    assert_eq!(event_ids(&back), vec!["ev5", "ev4"]);
    assert!(back["meta"]["page"]["next"].is_string(), "older events exist: {back}");
    assert!(back["meta"]["page"]["previous"].is_null(), "nothing is newer: {back}");
    let back = list(&ledger, &third["meta"]["page"]["previous"].as_str().expect("previous")[EVENTS.len()..]).await;
    assert_eq!(event_ids(&back), vec!["ev3", "ev2"]);
    assert!(back["meta"]["page"]["next"].is_string() && back["meta"]["page"]["previous"].is_string(), "{back}");

    let cases: &[(&str, &[&str])] = &[
        ("?filter[subject]=s-b", &["ev4", "ev2"]),
        ("?filter[subject][eq]=s-a", &["ev5", "ev3", "ev1"]),
        ("?filter[subject][neq]=s-a", &["ev4", "ev2"]),
        ("?filter[type][eq]=response", &["ev4", "ev2"]),
        ("?filter[id][oeq]=ev1,ev2", &["ev2", "ev1"]),
        ("?filter[id][ocontains]=1,5", &["ev5", "ev1"]),
        ("?filter[source][contains]=gw-2", &["ev5", "ev3", "ev1"]),
        ("?filter[subject][eq]=s-a&filter[source][eq]=gw-1", &[]),
    ];
    for (query, expected) in cases {
        assert_eq!(event_ids(&list(&ledger, query).await), expected.to_vec(), "{query}");
    }
    let filtered = list(&ledger, "?filter[subject][eq]=s-a&page[size]=2").await;
    assert_eq!(event_ids(&filtered), vec!["ev5", "ev3"]);
    let next = filtered["meta"]["page"]["next"].as_str().expect("next");
    assert!(next.contains("filter%5Bsubject%5D%5Beq%5D=s-a"), "{next}");
    assert_eq!(event_ids(&list(&ledger, &next[EVENTS.len()..]).await), vec!["ev1"]);

    for (query, field) in [
        ("?page[after]=%%%", "page[after]"),
        ("?page[before]=bm9wZQ", "page[before]"),
        ("?page[size]=ten", "page[size]"),
        ("?filter[subject][like]=s", "filter[subject][like]"),
        ("?filter[customer]=x", "filter[customer]"),
    ] {
        let reply = ledger.call(reqwest::Method::GET, &format!("{EVENTS}{query}")).send().await;
        reply.assert_problem(400, Some(field));
    }
}

async fn malformed_events_are_refused_and_nothing_is_stored(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let with = |extra: Value| support::merged(event("bad", "s"), extra);
    let single = "application/cloudevents+json";
    let cases: Vec<(&str, Value, &str)> = vec![
        (single, with(json!({"subject": null})), "subject"),
        (single, with(json!({"id": ""})), "id"),
        (single, with(json!({"source": ""})), "source"),
        (single, with(json!({"type": ""})), "type"),
        (single, with(json!({"colour": "red"})), "colour"),
        (single, with(json!({"datacontenttype": "text/plain"})), "datacontenttype"),
        (single, with(json!({"dataschema": ""})), "dataschema"),
        (single, with(json!({"dataschema": "AAA"})), "dataschema"),
        (single, with(json!({"dataschema": "https://example.com/a schema"})), "dataschema"),
        (
            single,
            json!({"id": "n", "source": "s", "specversion": "1.0", "type": "t", "subject": "s", "datacontenttype": null}),
            "datacontenttype",
        ),
        (single, with(json!({"data": "not an object"})), "data"),
        (single, with(json!({"time": "yesterday"})), "time"),
        (single, json!([event("a", "s")]), "[0]"), // an array is not one event: its first element is wrong
        ("application/cloudevents-batch+json", json!([event("a", "s"), with(json!({"subject": ""}))]), "[1].subject"),
        ("application/cloudevents-batch+json", json!([event("a", "s"), with(json!({"colour": 1}))]), "[1].colour"),
        ("application/cloudevents-batch+json", event("a", "s"), "body"),
        ("application/json", with(json!({"specversion": null})), "[0].specversion"),
        ("application/json", json!("text"), "[0]"),
        // Attributes are columns of their own, which cannot hold NUL (PostgreSQL); the NUL in
        // `data` beside it does not hide it.
        (single, with(json!({"subject": "s\u{0}", "data": {"a": "\u{0}"}})), "subject"),
        ("application/cloudevents-batch+json", json!([event("a", "s"), with(json!({"id": "\u{0}"}))]), "[1].id"),
    ];
    for (content_type, body, field) in cases {
        let reply = ingest(&ledger, content_type, &body).await;
        reply.assert_problem(400, Some(field));
    }
    let too_many = Value::Array((0..1001).map(|i| event(&format!("n{i}"), "s")).collect());
    ingest(&ledger, "application/json", &too_many).await.assert_problem(400, Some("body"));
    let reply = ledger.call(reqwest::Method::POST, EVENTS).body(Some(single), "{").send().await;
    reply.assert_problem(400, Some("body"));
    for content_type in [Some("text/plain"), Some("application/xml"), Some("application/x-www-form-urlencoded"), None] {
        let reply =
            ledger.call(reqwest::Method::POST, EVENTS).body(content_type, event("a", "s").to_string()).send().await;
        reply.assert_problem(400, Some("Content-Type"));
    }
    assert_eq!(ledger.row_counts().await["events"], 0, "nothing stored");
    assert_eq!(data(&list(&ledger, "").await).len(), 0);
}

/// `data` is stored as JSON text, so a NUL in it is kept (escaped), as received.
async fn a_nul_character_in_event_data_is_kept(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let mut with_nul = event("nul", "s");
    with_nul["data"] = json!({"text": "a\u{0}b", "k\u{0}": 1});
    ingest_ok(&ledger, "application/cloudevents-batch+json", &json!([with_nul, event("plain", "s")])).await;
    let all = list(&ledger, "").await;
    let events: Vec<&Value> = data(&all).iter().map(|e| &e["event"]).collect();
    assert!(events.contains(&&with_nul), "{all}");
    assert_eq!(events.len(), 2, "{all}");
}

async fn health_metrics_and_openapi_are_served(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let health = ledger.call_without_token(reqwest::Method::GET, "/healthz").send().await;
    assert_eq!((health.status, health.text.as_str()), (200, "ok\n"));

    let c = ledger.customer("metered").await;
    ledger.grant(&c, support::grant_body("10", json!({}))).await;
    let (status, _) = ledger.charge(&c, "4", "m1").await;
    assert_eq!(status, 201);
    let (status, _) = ledger.charge(&c, "40", "m2").await;
    assert_eq!(status, 402);
    let metrics = ledger.call_without_token(reqwest::Method::GET, "/metrics").send().await;
    assert_eq!(metrics.status, 200);
    assert_eq!(metrics.content_type, "text/plain; version=0.0.4");
    let text = metrics.text;
    let charges = "/v3/openmeter/customers/{customerId}/credits/charges";
    for line in [
        "# TYPE credits_ledger_requests_total counter".to_owned(),
        format!("credits_ledger_requests_total{{method=\"POST\",route=\"{charges}\",status=\"201\"}} 1"),
        format!("credits_ledger_requests_total{{method=\"POST\",route=\"{charges}\",status=\"402\"}} 1"),
        "credits_ledger_requests_total{method=\"POST\",route=\"/v3/openmeter/customers\",status=\"201\"} 1".to_owned(),
        "credits_ledger_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 1".to_owned(),
        "# TYPE credits_ledger_bookings_total counter".to_owned(),
        "credits_ledger_bookings_total{kind=\"funded\"} 1".to_owned(),
        "credits_ledger_bookings_total{kind=\"consumed\"} 1".to_owned(),
        format!("credits_ledger_request_duration_seconds_count{{route=\"{charges}\"}} 2"),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }

    let openapi = ledger.call_without_token(reqwest::Method::GET, "/v3/openapi.json").send().await;
    assert_eq!(openapi.status, 200, "{}", openapi.text);
    let doc = openapi.body;
    let customer = "/v3/openmeter/customers/{customerId}";
    let expected: Vec<(String, &[&str])> = vec![
        ("/v3/openmeter/customers".into(), &["get", "post"]),
        (customer.into(), &["get", "put", "delete"]),
        (format!("{customer}/credits/grants"), &["get", "post"]),
        (format!("{customer}/credits/grants/{{creditGrantId}}"), &["get"]),
        (format!("{customer}/credits/grants/{{creditGrantId}}/settlement/external"), &["post"]),
        (format!("{customer}/credits/grants/{{creditGrantId}}/void"), &["post"]),
        (format!("{customer}/credits/balance"), &["get"]),
        (format!("{customer}/credits/transactions"), &["get"]),
        (format!("{customer}/credits/adjustments"), &["post"]),
        (format!("{customer}/credits/charges"), &["post"]),
        ("/v3/openmeter/events".into(), &["get", "post"]),
    ];
    for (path, methods) in expected {
        for method in methods {
            assert!(doc["paths"][&path][method].is_object(), "{method} {path} missing from the OpenAPI document");
        }
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object(), "bearer auth is described");
    assert_eq!(doc["info"]["title"], "credits-ledger");
    ledger.assert_journal_sound().await;
}

/// An event's `id` and `source` are its unique key; one longer than PostgreSQL can index was a
/// 500 there (and stored on SQLite): both now refuse it with a 400 naming the field.
async fn an_event_id_or_source_too_long_to_index_is_refused(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let long = "i".repeat(1025);
    for (field, event) in [
        ("id", json!({"id": long, "source": "gateway", "specversion": "1.0", "type": "request", "subject": "s"})),
        ("source", json!({"id": "e1", "source": long, "specversion": "1.0", "type": "request", "subject": "s"})),
    ] {
        ledger
            .call(reqwest::Method::POST, "/v3/openmeter/events")
            .body(Some("application/cloudevents+json"), event.to_string())
            .send()
            .await
            .assert_problem(400, Some(field));
    }
    let at_the_limit = json!({"id": "i".repeat(1024), "source": "s".repeat(1024), "specversion": "1.0",
        "type": "request", "subject": "s"});
    let reply = ledger
        .call(reqwest::Method::POST, "/v3/openmeter/events")
        .body(Some("application/cloudevents+json"), at_the_limit.to_string())
        .send()
        .await;
    assert_eq!(reply.status, 202, "{}", reply.text);
}

/// Anyone, without a token, names the HTTP method: one it invents is counted as `other`, not as a
/// metric series of its own.
async fn methods_a_client_invents_add_no_metric_series(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let metrics = |l: &Ledger| {
        let http = l.http.clone();
        let url = l.url("/metrics");
        async move { http.get(url).send().await.expect("metrics").text().await.expect("text") }
    };
    let series = |text: &str| text.lines().filter(|l| l.starts_with("credits_ledger_requests_total{")).count();
    let before = series(&metrics(&ledger).await);
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(format!("X{i:04}").as_bytes()).expect("method");
        let _ = ledger.http.request(method, ledger.url("/v3/openmeter/customers")).send().await.expect("sent");
    }
    let after = series(&metrics(&ledger).await);
    assert!(after <= before + 2, "200 invented methods added {} series: {before} -> {after}", after - before);
}

on_both_backends!(
    methods_a_client_invents_add_no_metric_series,
    an_event_id_or_source_too_long_to_index_is_refused,
    events_are_accepted_in_every_content_type_and_stored_once,
    events_list_pages_with_cursors_and_filters,
    malformed_events_are_refused_and_nothing_is_stored,
    a_nul_character_in_event_data_is_kept,
    health_metrics_and_openapi_are_served,
);
