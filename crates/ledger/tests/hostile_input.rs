//! Input meant to break the ledger: amounts at and beyond the bounds, sums that would overflow,
//! list filters with too many values, cursors and page numbers at the edge of i64. Every one is
//! answered (a 4xx problem naming the field, or a per-subject rejection in a sync), books nothing
//! it should not, and the ledger goes on serving.

mod support;

use reqwest::Method;
use serde_json::{json, Value};
use support::{
    customer_path, grant_body, lease_request, subject_sync, usage_range, Backend, Ledger, TestDb, GATEWAY_TOKEN,
};

/// rust_decimal's largest value: two of them overflowed an addition and killed the process.
const HUGE: &str = "79228162514264337593543950335";
/// The bound on any single amount (credits::limits::MAX_AMOUNT).
const MAX_AMOUNT: &str = "1000000000000000";

async fn expect_400(ledger: &Ledger, method: Method, path: &str, body: Value, field: &str) {
    let reply = ledger.call(method, path).json(&body).send().await;
    reply.assert_problem(400, Some(field));
}

async fn huge_amounts_are_refused_and_the_ledger_lives(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("huge").await;
    let customer = customer_path(&c);
    let grants = format!("{customer}/credits/grants");
    for _ in 0..2 {
        expect_400(&ledger, Method::POST, &grants, grant_body(HUGE, json!({})), "amount").await;
    }
    let adjustment = json!({"name": "fix", "currency": "USD", "amount": HUGE});
    expect_400(&ledger, Method::POST, &format!("{customer}/credits/adjustments"), adjustment, "amount").await;
    let adjustment = json!({"name": "fix", "currency": "USD", "amount": format!("-{HUGE}")});
    expect_400(&ledger, Method::POST, &format!("{customer}/credits/adjustments"), adjustment, "amount").await;
    let charge = json!({"amount": HUGE, "currency": "USD", "settlement_mode": "credit_then_invoice", "key": "k"});
    expect_400(&ledger, Method::POST, &format!("{customer}/credits/charges"), charge, "amount").await;
    let basis = json!({"funding_method": "invoice", "purchase": {"currency": "USD", "per_unit_cost_basis": HUGE}});
    expect_400(&ledger, Method::POST, &grants, grant_body("1", basis), "purchase.per_unit_cost_basis").await;
    let reply = ledger
        .call_as(GATEWAY_TOKEN, Method::GET, "/v3/gateway/authorize/x")
        .header("x-consumer-username", "huge-subject")
        .header("x-credits-price", HUGE)
        .header("x-credits-currency", "USD")
        .send()
        .await;
    reply.assert_problem(400, Some("x-credits-price"));
    // The same through the gateway sync: that subject is rejected, the rest of the batch books.
    let other = ledger.customer("other").await;
    ledger.grant(&other, grant_body("10", json!({}))).await;
    let subjects = json!([
        subject_sync("huge-subject", json!({"usage": usage_range(0, 1, HUGE, "credit_only")})),
        subject_sync("huge-subject", json!({"lease": lease_request("n/huge", 1, HUGE, 30000)})),
        subject_sync("other-subject", json!({"usage": usage_range(0, 1, "1", "credit_only")})),
    ]);
    let (status, body) = ledger.sync(json!({"node": "n", "subjects": subjects})).await;
    assert_eq!(status, 200, "{body}");
    for answer in &body["subjects"].as_array().expect("answers")[..2] {
        assert_eq!(answer["status"], "rejected", "{answer}");
        assert!(answer["reason"].as_str().is_some_and(|r| r.contains("out of bounds")), "{answer}");
    }
    assert_eq!(body["subjects"][2]["status"], "ok", "{body}");
    assert_eq!(ledger.balance(&other, "").await.0, "9");
    assert_eq!(ledger.balances(&c, "").await, json!([]), "nothing booked for the huge customer");
    ledger.assert_journal_sound().await;
}

async fn amounts_are_bounded_in_magnitude_and_decimal_places(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("bounds").await;
    let customer = customer_path(&c);
    let grants = format!("{customer}/credits/grants");
    ledger.grant(&c, grant_body(MAX_AMOUNT, json!({}))).await;
    ledger.grant(&c, grant_body("0.000000001", json!({}))).await;
    for beyond in ["1000000000000000.000000001", "1000000000000001", "0.0000000001", "1.0000000000"] {
        expect_400(&ledger, Method::POST, &grants, grant_body(beyond, json!({})), "amount").await;
        let charge = json!({"amount": beyond, "currency": "USD", "settlement_mode": "credit_only", "key": "k"});
        expect_400(&ledger, Method::POST, &format!("{customer}/credits/charges"), charge, "amount").await;
    }
    let (status, body) = ledger.charge(&c, MAX_AMOUNT, "all").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(ledger.balance(&c, "").await.0, "0.000000001");
    ledger.assert_journal_sound().await;
}

/// A gateway can book uncovered usage without bound: after 10^19 of debt the customer's book
/// cannot sum any more, and each further range is rejected — the rest of the batch books.
async fn usage_that_would_overflow_a_balance_is_rejected_per_subject() {
    let db = TestDb::new(Backend::Sqlite).await;
    let ledger = Ledger::start(&db).await;
    let keys: Vec<String> = (0..100).map(|i| format!("s{i}")).collect();
    let (status, body) = ledger
        .post(
            "/v3/openmeter/customers",
            json!({"name": "debtor", "key": "debtor", "usage_attribution": {"subject_keys": keys}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let debtor = body["id"].as_str().expect("id").to_owned();
    let other = ledger.customer("other").await;
    let batch = |n: u64, extra: Option<Value>| {
        let mut subjects: Vec<Value> = (0..1000)
            .map(|i| {
                let range = usage_range(n, n + 1, MAX_AMOUNT, "credit_only");
                json!({"subject": format!("s{}", i % 100), "currency": "USD", "feature_key": format!("f{}", i / 100), "usage": range})
            })
            .collect();
        if let Some(e) = extra {
            subjects[999] = e;
        }
        json!({"node": "n", "subjects": subjects})
    };
    for n in 0..10 {
        let (status, body) = ledger.sync(batch(n, None)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["subjects"].as_array().expect("answers").iter().all(|a| a["status"] == "ok"), "sync {n}");
    }
    assert_eq!(ledger.balance(&debtor, "").await.0, "-10000000000000000000", "10^19 of debt: the bound");
    let (status, body) = ledger
        .sync(batch(10, Some(subject_sync("other-subject", json!({"usage": usage_range(0, 1, "1", "credit_only")})))))
        .await;
    assert_eq!(status, 200, "{body}");
    let answers = body["subjects"].as_array().expect("answers");
    assert!(answers[..999].iter().all(|a| a["status"] == "rejected"), "{}", answers[0]);
    assert!(answers[0]["reason"].as_str().is_some_and(|r| r.contains("10^19")), "{}", answers[0]);
    assert_eq!(answers[999]["status"], "ok");
    assert_eq!(ledger.balance(&other, "").await.0, "-1");
    assert_eq!(ledger.balance(&debtor, "").await.0, "-10000000000000000000", "nothing more booked");
    // The same bound on the admin side: a further debit is a 422 that books nothing.
    let adjustment = json!({"name": "fix", "currency": "USD", "amount": "-1"});
    let reply = ledger.call(Method::POST, &format!("{}/credits/adjustments", customer_path(&debtor))).json(&adjustment);
    reply.send().await.assert_problem(422, None);
    assert_eq!(ledger.balance(&debtor, "").await.0, "-10000000000000000000", "nothing more booked");
    ledger.assert_journal_sound().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_usage_that_would_overflow_a_balance_is_rejected_per_subject() {
    usage_that_would_overflow_a_balance_is_rejected_per_subject().await
}

fn list(n: usize) -> String {
    (0..n).map(|i| format!("v{i}")).collect::<Vec<_>>().join(",")
}

async fn list_filters_are_capped(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("lists").await;
    let customer = customer_path(&c);
    let features = |n: usize| (0..n).map(|i| format!("f{i}")).collect::<Vec<_>>().join(",");
    let currencies = |n: usize| {
        (0..n)
            .map(|i| format!("C{}{}", (b'A' + (i / 26) as u8) as char, (b'A' + (i % 26) as u8) as char))
            .collect::<Vec<_>>()
            .join(",")
    };
    let cases = [
        ("/v3/openmeter/customers".to_owned(), "key", "oeq", list as fn(usize) -> String),
        ("/v3/openmeter/customers".to_owned(), "usage_attribution_subject_key", "ocontains", list),
        (format!("{customer}/credits/grants"), "key", "oeq", list),
        (format!("{customer}/credits/transactions"), "feature_key", "oeq", features),
        (format!("{customer}/credits/balance"), "feature_key", "ocontains", features),
        (format!("{customer}/credits/balance"), "currency", "oeq", currencies),
        ("/v3/openmeter/events".to_owned(), "subject", "oeq", list),
    ];
    for (path, field, op, values) in cases {
        let name = format!("filter[{field}][{op}]");
        let at_cap = format!("{path}?{}={}", support::enc(&name), values(100));
        let (status, body) = ledger.get(&at_cap).await;
        assert_eq!(status, 200, "{at_cap}: {body}");
        let beyond = format!("{path}?{}={}", support::enc(&name), values(101));
        let reply = ledger.call(Method::GET, &beyond).send().await;
        reply.assert_problem(400, Some(&name));
    }
}

async fn cursors_and_page_numbers_at_the_edge_of_i64_never_wrap(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("pages").await;
    ledger.grant(&c, grant_body("1", json!({}))).await;
    let customer = customer_path(&c);
    let cursor = |n: i64| ledger::api::request::encode_cursor(n);
    for path in [
        format!("{customer}/credits/transactions"),
        "/v3/openmeter/events".to_owned(),
        "/v3/openmeter/notification/events".to_owned(),
    ] {
        for n in [0, 1, i64::MAX - 1, i64::MAX] {
            for side in ["after", "before"] {
                let (status, body) = ledger.get(&format!("{path}?page%5B{side}%5D={}", cursor(n))).await;
                assert_eq!(status, 200, "{path} page[{side}]={n}: {body}");
            }
        }
        // A cursor beyond i64 is none this API issued: refused, never wrapped.
        use base64::Engine as _;
        let beyond = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("c1:9223372036854775808");
        for side in ["after", "before"] {
            let reply = ledger.call(Method::GET, &format!("{path}?page%5B{side}%5D={beyond}")).send().await;
            reply.assert_problem(400, Some(&format!("page[{side}]")));
        }
    }
    // A cursor is read as given, never wrapped: older than the largest is every movement (the
    // grant's one), newer than it none; older than 0 none, newer than 0 every one.
    for (side, n, expected) in [("after", i64::MAX, 1), ("before", i64::MAX, 0), ("after", 0, 0), ("before", 0, 1)] {
        let query = format!("?page%5B{side}%5D={}", cursor(n));
        let (status, body) = ledger.get(&format!("{customer}/credits/transactions{query}")).await;
        assert_eq!((status, body["data"].as_array().map(Vec::len)), (200, Some(expected)), "page[{side}]={n}: {body}");
    }
    for path in [
        "/v3/openmeter/customers".to_owned(),
        format!("{customer}/credits/grants"),
        "/v3/openmeter/notification/channels".to_owned(),
        "/v3/openmeter/notification/rules".to_owned(),
    ] {
        let (status, body) = ledger.get(&format!("{path}?page%5Bnumber%5D={}", i64::MAX)).await;
        assert_eq!((status, body["data"].clone()), (200, json!([])), "{path}: {body}");
        // What the schema allows is accepted as Konnect does: beyond i64 is the last possible
        // page, below 1 the first; only what is no integer is refused.
        for beyond in ["9223372036854775808", "99999999999999999999"] {
            let (status, body) = ledger.get(&format!("{path}?page%5Bnumber%5D={beyond}")).await;
            assert_eq!((status, body["meta"]["page"]["number"].clone()), (200, json!(i64::MAX)), "{path}: {body}");
        }
        for below in ["-1", "0", "-99999999999999999999"] {
            let (status, body) = ledger.get(&format!("{path}?page%5Bnumber%5D={below}")).await;
            assert_eq!((status, body["meta"]["page"]["number"].clone()), (200, json!(1)), "{path}: {body}");
        }
        for bad in ["1.5", "x", "", "1e3"] {
            let reply = ledger.call(Method::GET, &format!("{path}?page%5Bnumber%5D={bad}")).send().await;
            reply.assert_problem(400, Some("page[number]"));
        }
    }
    ledger.assert_journal_sound().await;
}

/// Found by the router fuzzer: a path parameter that is not UTF-8 once decoded was answered by
/// axum's own text/plain 400.
async fn undecodable_path_parameters_are_a_problem_naming_them(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("paths").await;
    let reply = ledger.call(Method::GET, "/v3/openmeter/customers/%FF%FE").send().await;
    reply.assert_problem(400, Some("customerId"));
    let reply = ledger.call(Method::GET, &format!("{}/credits/grants/%C0", customer_path(&c))).send().await;
    reply.assert_problem(400, Some("creditGrantId"));
}

/// PostgreSQL cannot store U+0000 in text: a NUL anywhere in a body or a query failed the whole
/// transaction (a 500, and in a sync the syncs grouped with it). Refused up front, naming where.
async fn nul_characters_are_refused_naming_where(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("nul").await;
    ledger.grant(&c, grant_body("10.00", json!({}))).await;
    let before = ledger.snapshot(&c).await;
    let customers = "/v3/openmeter/customers";
    let customer =
        |key: &str, subject: &str| json!({"name": "n", "key": key, "usage_attribution": {"subject_keys": [subject]}});
    expect_400(&ledger, Method::POST, customers, customer("k\0", "s"), "key").await;
    expect_400(&ledger, Method::POST, customers, customer("k", "s\0"), "usage_attribution.subject_keys[0]").await;
    let mut labelled = customer("k", "s");
    labelled["labels"] = json!({"team": "a\0b"});
    expect_400(&ledger, Method::POST, customers, labelled, "labels.team").await;
    let mut grant = grant_body("1.00", json!({}));
    grant["name"] = json!("\0");
    expect_400(&ledger, Method::POST, &format!("{}/credits/grants", customer_path(&c)), grant, "name").await;

    let usage = json!({"usage": usage_range(0, 1, "1.00", "credit_only")});
    let sync = |node: &str, subject: &str| json!({"node": node, "subjects": [subject_sync(subject, usage.clone())]});
    expect_400(&ledger, Method::POST, "/v3/gateway/sync", sync("node\0", "nul-subject"), "node").await;
    expect_400(&ledger, Method::POST, "/v3/gateway/sync", sync("node", "nul-subject\0"), "subjects[0].subject").await;

    let reply = ledger.call(Method::GET, &format!("{customers}?filter[name][contains]=%00")).send().await;
    reply.assert_problem(400, Some("filter[name][contains]"));
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked");

    // The six characters `\u0000` as text are no NUL.
    let (status, body) = ledger.post(customers, customer("backslash-u0000", "a\\u0000b")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["usage_attribution"]["subject_keys"][0], "a\\u0000b");
    let (status, answer) = ledger.sync(sync("node", "nul-subject")).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["subjects"][0]["usage"], "booked", "{answer}");
    ledger.assert_journal_sound().await;
}

/// "a page at most 1000 items (a larger `page[size]` is read as 1000, as Konnect's engine does)":
/// on every list, paged by number or by cursor.
async fn every_list_reads_a_page_size_beyond_1000_as_1000(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("sizes").await;
    let customer = customer_path(&c);
    for path in [
        "/v3/openmeter/customers".to_owned(),
        format!("{customer}/credits/grants"),
        format!("{customer}/credits/transactions"),
        "/v3/openmeter/events".to_owned(),
        "/v3/openmeter/notification/channels".to_owned(),
        "/v3/openmeter/notification/rules".to_owned(),
        "/v3/openmeter/notification/events".to_owned(),
    ] {
        for size in ["1001", "99999999999999999999"] {
            let (status, body) = ledger.get(&format!("{path}?page%5Bsize%5D={size}")).await;
            assert_eq!(
                (status, body["meta"]["page"]["size"].clone()),
                (200, json!(1000)),
                "{path} page[size]={size}: {body}"
            );
        }
    }
}

on_both_backends!(
    every_list_reads_a_page_size_beyond_1000_as_1000,
    nul_characters_are_refused_naming_where,
    undecodable_path_parameters_are_a_problem_naming_them,
    huge_amounts_are_refused_and_the_ledger_lives,
    amounts_are_bounded_in_magnitude_and_decimal_places,
    list_filters_are_capped,
    cursors_and_page_numbers_at_the_edge_of_i64_never_wrap,
);
