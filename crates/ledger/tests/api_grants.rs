//! `…/credits/grants`: creation with defaults and purchase terms, expiry durations, pending
//! grants, idempotency keys, list filters, external settlement and voiding.

mod support;

use serde_json::{json, Value};
use support::{column, customer_path, data, format_time, grant_body, parse_time, shift, Backend, Ledger, TestDb};

fn grants_path(customer: &str) -> String {
    format!("{}/credits/grants", customer_path(customer))
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_owned()
}

async fn list(ledger: &Ledger, customer: &str, query: &str) -> Value {
    let (status, body) = ledger.get(&format!("{}{query}", grants_path(customer))).await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn grant_defaults_purchase_terms_and_round_trip(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("buyer").await;

    let promo = ledger.grant(&c, grant_body("100", json!({}))).await;
    assert_eq!(promo["name"], "grant");
    assert_eq!(promo["funding_method"], "none");
    assert_eq!(promo["currency"], "USD");
    assert_eq!(promo["amount"], "100");
    assert_eq!(promo["priority"], 10, "default priority");
    assert_eq!(promo["status"], "active");
    assert_eq!(promo["filters"], json!({"features": []}));
    assert_eq!(promo["labels"], json!({}));
    assert_eq!(promo["effective_at"], promo["created_at"], "effective at creation by default");
    assert_eq!(promo["updated_at"], promo["created_at"]);
    for absent in ["purchase", "expires_at", "voided_at", "key", "description", "tax_config"] {
        assert!(promo.get(absent).is_none(), "{absent} in {promo}");
    }

    let invoiced = ledger
        .grant(
            &c,
            grant_body(
                "100",
                json!({"funding_method": "invoice", "purchase": {"currency": "EUR", "per_unit_cost_basis": "0.50"},
                    "priority": 1, "key": "inv-1", "labels": {"source": "invoice"}, "description": "bought credit",
                    "tax_config": {"behavior": "exclusive"}, "filters": {"features": ["tokens", "api_requests", "tokens"]}}),
            ),
        )
        .await;
    assert_eq!(
        invoiced["purchase"],
        json!({"currency": "EUR", "per_unit_cost_basis": "0.50", "amount": "50.00",
            "availability_policy": "on_creation", "settlement_status": "pending"})
    );
    assert_eq!(invoiced["funding_method"], "invoice");
    assert_eq!(invoiced["priority"], 1);
    assert_eq!(invoiced["key"], "inv-1");
    assert_eq!(invoiced["labels"], json!({"source": "invoice"}));
    assert_eq!(invoiced["description"], "bought credit");
    assert_eq!(invoiced["tax_config"], json!({"behavior": "exclusive"}));
    assert_eq!(invoiced["filters"], json!({"features": ["api_requests", "tokens"]}), "sorted, without repeats");

    // The cost basis defaults to one.
    let external = ledger
        .grant(
            &c,
            grant_body(
                "12.5",
                json!({"funding_method": "external", "purchase": {"currency": "USD"}, "priority": 1000}),
            ),
        )
        .await;
    assert_eq!(external["purchase"]["per_unit_cost_basis"], "1");
    assert_eq!(external["purchase"]["amount"], "12.5");
    assert_eq!(external["purchase"]["settlement_status"], "pending");
    assert_eq!(external["priority"], 1000);

    for g in [&promo, &invoiced, &external] {
        let (status, fetched) = ledger.get(&format!("{}/{}", grants_path(&c), id_of(g))).await;
        assert_eq!(status, 200, "{fetched}");
        assert_eq!(&fetched, g);
    }
    let listed = list(&ledger, &c, "").await;
    assert_eq!(data(&listed), &vec![promo.clone(), invoiced.clone(), external.clone()], "creation order");
    assert_eq!(listed["meta"]["page"], json!({"number": 1, "size": 100, "total": 3}));

    assert_eq!(ledger.balance(&c, "").await, ("212.5".into(), "212.5".into(), "0".into()));
    let history = ledger.all_transactions(&c).await;
    let summary: Vec<(String, String, String, String, String)> = history
        .iter()
        .map(|t| {
            let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
            (
                s(&t["type"]),
                s(&t["amount"]),
                s(&t["grant_id"]),
                s(&t["available_balance"]["before"]),
                s(&t["available_balance"]["after"]),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("funded".into(), "12.5".into(), id_of(&external), "200".into(), "212.5".into()),
            ("funded".into(), "100".into(), id_of(&invoiced), "100".into(), "200".into()),
            ("funded".into(), "100".into(), id_of(&promo), "0".into(), "100".into()),
        ]
    );
    ledger.assert_journal_sound().await;
}

async fn grant_expiry_follows_the_iso_duration_on_the_calendar(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("durations").await;
    let start = "2030-01-31T12:00:00Z";
    let hour = ledger.grant(&c, grant_body("1", json!({"effective_at": start, "expires_after": "PT1H"}))).await;
    let month = ledger.grant(&c, grant_body("2", json!({"effective_at": start, "expires_after": "P1M"}))).await;
    let days = ledger.grant(&c, grant_body("4", json!({"effective_at": start, "expires_after": "P30D"}))).await;
    assert_eq!(hour["expires_at"], "2030-01-31T13:00:00Z");
    assert_eq!(month["expires_at"], "2030-02-28T12:00:00Z", "calendar month from Jan 31");
    assert_eq!(days["expires_at"], "2030-03-02T12:00:00Z");
    for g in [&hour, &month, &days] {
        assert_eq!(g["effective_at"], start);
        assert_eq!(g["status"], "pending");
    }
    // Without effective_at the duration runs from creation.
    let now_grant = ledger.grant(&c, grant_body("8", json!({"expires_after": "P30D"}))).await;
    let created = parse_time(now_grant["created_at"].as_str().unwrap_or(""));
    assert_eq!(parse_time(now_grant["expires_at"].as_str().unwrap_or("")), created + chrono::TimeDelta::days(30));
    assert_eq!(now_grant["status"], "active");
    let expires = now_grant["expires_at"].as_str().unwrap_or("").to_owned();

    assert_eq!(ledger.balance(&c, "").await, ("8".into(), "8".into(), "7".into()));
    // Future instants: funding at effective_at, each expiry exactly at its expires_at.
    let at = |t: &str| format!("?timestamp={}", support::enc(t));
    let cases = [
        (shift(&expires, -1), ("8", "7")),
        (expires.clone(), ("0", "7")),
        ("2030-01-31T11:59:59.999999Z".to_owned(), ("0", "7")),
        (start.to_owned(), ("7", "0")),
        ("2030-01-31T12:59:59.999999Z".to_owned(), ("7", "0")),
        ("2030-01-31T13:00:00Z".to_owned(), ("6", "0")),
        ("2030-02-28T11:59:59.999999Z".to_owned(), ("6", "0")),
        ("2030-02-28T12:00:00Z".to_owned(), ("4", "0")),
        ("2030-03-02T11:59:59.999999Z".to_owned(), ("4", "0")),
        ("2030-03-02T12:00:00Z".to_owned(), ("0", "0")),
    ];
    for (t, (settled, pending)) in cases {
        let (s, l, p) = ledger.balance(&c, &at(&t)).await;
        assert_eq!((s.as_str(), l.as_str(), p.as_str()), (settled, settled, pending), "at {t}");
    }
    assert_eq!(column(&list(&ledger, &c, "?filter[status]=pending").await, "amount"), vec!["1", "2", "4"]);
    assert_eq!(column(&list(&ledger, &c, "?filter[status]=active").await, "amount"), vec!["8"]);
    // Looking at the future books nothing.
    let history = ledger.all_transactions(&c).await;
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["type"], "funded");
    ledger.assert_journal_sound().await;
}

async fn future_grant_is_pending_until_it_becomes_effective(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("patient").await;
    let effective = format_time(ledger.db_now().await + chrono::TimeDelta::hours(1));
    let g = ledger.grant(&c, grant_body("100", json!({"effective_at": effective}))).await;
    assert_eq!(g["status"], "pending");
    assert_eq!(parse_time(g["effective_at"].as_str().unwrap_or("")), parse_time(&effective));
    assert_eq!(ledger.balance(&c, "").await, ("0".into(), "0".into(), "100".into()));
    let at = |t: &str| format!("?timestamp={}", support::enc(t));
    assert_eq!(ledger.balance(&c, &at(&shift(&effective, -1))).await, ("0".into(), "0".into(), "100".into()));
    assert_eq!(ledger.balance(&c, &at(&effective)).await, ("100".into(), "100".into(), "0".into()));
    // Pending credit cannot be spent.
    let (status, body) = ledger.charge(&c, "1", "too-early").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(body["available"], "0");
    assert!(ledger.all_transactions(&c).await.is_empty(), "nothing funded yet");
    assert_eq!(column(&list(&ledger, &c, "?filter[status]=pending").await, "id"), vec![id_of(&g)]);
    assert_eq!(data(&list(&ledger, &c, "?filter[status]=active").await).len(), 0);
    ledger.assert_journal_sound().await;
}

async fn grant_keys_are_unique_per_customer(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c1, c2) = (ledger.customer("first").await, ledger.customer("second").await);
    let g = ledger.grant(&c1, grant_body("10", json!({"key": "g-1"}))).await;
    let before = ledger.snapshot(&c1).await;
    for body in [grant_body("10", json!({"key": "g-1"})), grant_body("99", json!({"key": "g-1", "currency": "EUR"}))] {
        let reply = ledger.call(reqwest::Method::POST, &grants_path(&c1)).json(&body).send().await;
        reply.assert_problem(409, Some("key"));
    }
    assert_eq!(ledger.snapshot(&c1).await, before, "a re-used key books nothing");
    assert_eq!(ledger.balance(&c1, "").await.0, "10");
    // Keys are per customer.
    let other = ledger.grant(&c2, grant_body("5", json!({"key": "g-1"}))).await;
    assert_ne!(other["id"], g["id"]);
    assert_eq!(column(&list(&ledger, &c1, "?filter[key]=g-1").await, "id"), vec![id_of(&g)]);
    assert_eq!(column(&list(&ledger, &c2, "?filter[key][eq]=g-1").await, "id"), vec![id_of(&other)]);
    ledger.assert_journal_sound().await;
}

async fn grant_list_filters_by_status_currency_and_key_and_paginates(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("lister").await;
    let later = format_time(ledger.db_now().await + chrono::TimeDelta::hours(1));
    let a = ledger.grant(&c, grant_body("1", json!({"key": "a"}))).await;
    let b = ledger.grant(&c, grant_body("2", json!({"key": "b", "currency": "EUR"}))).await;
    let pending = ledger.grant(&c, grant_body("3", json!({"key": "c", "effective_at": later}))).await;
    let voided = ledger.grant(&c, grant_body("4", json!({"key": "d"}))).await;
    let (status, body) = ledger.post(&format!("{}/{}/void", grants_path(&c), id_of(&voided)), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let expiring = ledger.grant(&c, grant_body("5", json!({"key": "e", "expires_after": "PT1S"}))).await;
    ledger.wait_past(expiring["expires_at"].as_str().unwrap_or("")).await;

    let all = list(&ledger, &c, "").await;
    assert_eq!(column(&all, "key"), vec!["a", "b", "c", "d", "e"]);
    assert_eq!(column(&all, "status"), vec!["active", "active", "pending", "voided", "expired"]);
    let ids = |v: &[&Value]| v.iter().map(|g| id_of(g)).collect::<Vec<_>>();
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("?filter[status]=active", ids(&[&a, &b])),
        ("?filter[status]=pending", ids(&[&pending])),
        ("?filter[status]=voided", ids(&[&voided])),
        ("?filter[status]=expired", ids(&[&expiring])),
        ("?filter[currency]=EUR", ids(&[&b])),
        ("?filter[currency]=USD", ids(&[&a, &pending, &voided, &expiring])),
        ("?filter[currency]=GBP", vec![]),
        ("?filter[key]=e", ids(&[&expiring])),
        ("?filter[key][oeq]=a,c", ids(&[&a, &pending])),
        ("?filter[key][neq]=a", ids(&[&b, &pending, &voided, &expiring])),
        ("?filter[key][contains]=d", ids(&[&voided])),
        ("?filter[key][ocontains]=b,e", ids(&[&b, &expiring])),
        ("?filter[status]=active&filter[currency]=USD", ids(&[&a])),
        ("?page[size]=2&page[number]=2", ids(&[&pending, &voided])),
        ("?page[size]=2&page[number]=3", ids(&[&expiring])),
        ("?page[size]=2&page[number]=4", vec![]),
        ("?filter[status]=active&page[size]=1&page[number]=2", ids(&[&b])),
    ];
    for (query, expected) in cases {
        assert_eq!(column(&list(&ledger, &c, query).await, "id"), expected, "{query}");
    }
    let paged = list(&ledger, &c, "?filter[status]=active&page[size]=1&page[number]=2").await;
    assert_eq!(paged["meta"]["page"], json!({"number": 2, "size": 1, "total": 2}));
    let paged = list(&ledger, &c, "?page[size]=2&page[number]=2").await;
    assert_eq!(paged["meta"]["page"], json!({"number": 2, "size": 2, "total": 5}));
    // Below 1 is the default (as Konnect's engine reads it).
    let paged = list(&ledger, &c, "?page[size]=0&page[number]=0").await;
    assert_eq!(paged["meta"]["page"], json!({"number": 1, "size": 100, "total": 5}));

    for (query, field) in [
        ("?filter[status]=bogus", "filter[status]"),
        ("?filter[currency]=usd", "filter[currency]"),
        ("?filter[currency]=US", "filter[currency]"),
        ("?filter[currency][eq]=USD", "filter[currency][eq]"),
        ("?filter[key][like]=a", "filter[key][like]"),
        ("?filter[priority]=1", "filter[priority]"),
        ("?page[size]=x", "page[size]"),
        ("?page[number]=x", "page[number]"),
    ] {
        let reply = ledger.call(reqwest::Method::GET, &format!("{}{query}", grants_path(&c))).send().await;
        reply.assert_problem(400, Some(field));
    }
    ledger.assert_journal_sound().await;
}

async fn external_settlement_updates_only_external_grants(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("settler").await;
    let ext = ledger
        .grant(
            &c,
            grant_body(
                "10",
                json!({"funding_method": "external", "purchase": {"currency": "USD", "per_unit_cost_basis": "2"}}),
            ),
        )
        .await;
    assert_eq!(ext["purchase"]["amount"], "20");
    let inv =
        ledger.grant(&c, grant_body("5", json!({"funding_method": "invoice", "purchase": {"currency": "USD"}}))).await;
    let promo = ledger.grant(&c, grant_body("5", json!({}))).await;
    let settle = |id: &str| format!("{}/{id}/settlement/external", grants_path(&c));
    let before = ledger.snapshot(&c).await;

    for status in ["authorized", "settled"] {
        let (code, body) = ledger.post(&settle(&id_of(&ext)), json!({"status": status})).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(body["purchase"]["settlement_status"], status);
        assert_eq!(body["purchase"]["amount"], "20");
        assert_eq!(body["amount"], "10");
        assert_eq!(body["status"], "active");
        assert!(
            parse_time(body["updated_at"].as_str().unwrap_or(""))
                >= parse_time(ext["updated_at"].as_str().unwrap_or(""))
        );
    }
    let (_, fetched) = ledger.get(&format!("{}/{}", grants_path(&c), id_of(&ext))).await;
    assert_eq!(fetched["purchase"]["settlement_status"], "settled");

    // Invoice and promotional grants are not settled through this endpoint.
    for g in [&inv, &promo] {
        let reply =
            ledger.call(reqwest::Method::POST, &settle(&id_of(g))).json(&json!({"status": "settled"})).send().await;
        reply.assert_problem(400, Some("funding_method"));
    }
    let (_, fetched) = ledger.get(&format!("{}/{}", grants_path(&c), id_of(&inv))).await;
    assert_eq!(fetched["purchase"]["settlement_status"], "pending");
    for (body, field) in [
        (json!({"status": "paid"}), "status"),
        (json!({}), "status"),
        (json!({"status": "settled", "note": "x"}), "note"),
    ] {
        let reply = ledger.call(reqwest::Method::POST, &settle(&id_of(&ext))).json(&body).send().await;
        reply.assert_problem(400, Some(field));
    }
    let reply = ledger
        .call(reqwest::Method::POST, &settle(support::UNKNOWN_ID))
        .json(&json!({"status": "settled"}))
        .send()
        .await;
    reply.assert_problem(404, None);

    // Settling moves no credit: the books are as they were, apart from the grant's status.
    let mut after = ledger.snapshot(&c).await;
    for g in after["grants"].as_array_mut().expect("grants") {
        if g["id"] == ext["id"] {
            g["purchase"]["settlement_status"] = json!("pending");
            g["updated_at"] = ext["updated_at"].clone();
        }
    }
    assert_eq!(after, before);
    ledger.assert_journal_sound().await;
}

async fn void_removes_the_unused_remainder_and_keeps_history(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("voider").await;
    let a = ledger.grant(&c, grant_body("100", json!({"priority": 1}))).await;
    let b = ledger.grant(&c, grant_body("50", json!({"priority": 2}))).await;
    let (status, charge) = ledger.charge(&c, "30", "before-void").await;
    assert_eq!(status, 201, "{charge}");
    assert_eq!(charge["consumed"], json!([{"grant_id": id_of(&a), "amount": "30"}]));
    assert_eq!(ledger.balance(&c, "").await.0, "120");
    let charged_at = charge["created_at"].as_str().unwrap_or("").to_owned();
    ledger.wait_past(&charged_at).await;

    let void = |id: &str| format!("{}/{id}/void", grants_path(&c));
    let (status, voided) = ledger.post(&void(&id_of(&a)), json!({})).await;
    assert_eq!(status, 200, "{voided}");
    assert_eq!(voided["status"], "voided");
    assert_eq!(voided["amount"], "100", "the grant keeps its amount");
    let voided_at = voided["voided_at"].as_str().expect("voided_at").to_owned();
    assert_eq!(ledger.balance(&c, "").await, ("50".into(), "50".into(), "0".into()));

    let history = ledger.all_transactions(&c).await;
    let summary: Vec<(String, String, String, String, String)> = history
        .iter()
        .map(|t| {
            let s = |v: &Value| v.as_str().unwrap_or("?").to_owned();
            (
                s(&t["type"]),
                s(&t["amount"]),
                s(&t["grant_id"]),
                s(&t["available_balance"]["before"]),
                s(&t["available_balance"]["after"]),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("expired".into(), "-70".into(), id_of(&a), "120".into(), "50".into()),
            ("consumed".into(), "-30".into(), id_of(&a), "150".into(), "120".into()),
            ("funded".into(), "50".into(), id_of(&b), "100".into(), "150".into()),
            ("funded".into(), "100".into(), id_of(&a), "0".into(), "100".into()),
        ],
        "the void is a new movement; everything before it stays"
    );
    assert_eq!(history[0]["booked_at"], json!(voided_at));
    // The past is unchanged.
    assert_eq!(ledger.settled_at(&c, &shift(&voided_at, -1)).await, "120");
    assert_eq!(ledger.settled_at(&c, &voided_at).await, "50");

    // Voiding again changes nothing.
    let (status, again) = ledger.post(&void(&id_of(&a)), json!({})).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["voided_at"], json!(voided_at));
    assert_eq!(ledger.all_transactions(&c).await.len(), 4);
    assert_eq!(ledger.balance(&c, "").await.0, "50");

    // A voided grant pays for nothing.
    let (status, refused) = ledger.charge(&c, "60", "too-much").await;
    assert_eq!(status, 402, "{refused}");
    assert_eq!(refused["available"], "50");
    let (status, paid) = ledger.charge(&c, "50", "rest").await;
    assert_eq!(status, 201, "{paid}");
    assert_eq!(paid["consumed"], json!([{"grant_id": id_of(&b), "amount": "50"}]));

    // A pending grant voided before it starts never funds.
    let later = format_time(ledger.db_now().await + chrono::TimeDelta::hours(1));
    let p = ledger.grant(&c, grant_body("7", json!({"effective_at": later}))).await;
    assert_eq!(ledger.balance(&c, "").await, ("0".into(), "0".into(), "7".into()));
    let (status, body) = ledger.post(&void(&id_of(&p)), json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "voided");
    assert_eq!(ledger.balance(&c, "").await, ("0".into(), "0".into(), "0".into()));
    assert_eq!(
        ledger.balance(&c, &format!("?timestamp={}", support::enc(&later))).await,
        ("0".into(), "0".into(), "0".into())
    );

    let (_, fetched) = ledger.get(&format!("{}/{}", grants_path(&c), id_of(&a))).await;
    assert_eq!(fetched["status"], "voided");
    assert_eq!(column(&list(&ledger, &c, "?filter[status]=voided").await, "id"), vec![id_of(&a), id_of(&p)]);
    let reply = ledger.call(reqwest::Method::POST, &void(support::UNKNOWN_ID)).send().await;
    reply.assert_problem(404, None);
    ledger.assert_journal_sound().await;
}

/// Re-sending the settlement status a grant already has changes nothing: the retry is answered
/// with the grant as it was (`updated_at` included).
async fn re_sending_the_same_settlement_status_changes_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("settler").await;
    let ext = ledger
        .grant(&c, grant_body("10", json!({"funding_method": "external", "purchase": {"currency": "USD"}})))
        .await;
    let id = ext["id"].as_str().expect("grant id");
    let settle = format!("{}/credits/grants/{id}/settlement/external", customer_path(&c));
    let (status, first) = ledger.post(&settle, json!({"status": "authorized"})).await;
    assert_eq!(status, 200, "{first}");
    ledger.wait_past(first["updated_at"].as_str().unwrap_or("")).await;
    let (status, retried) = ledger.post(&settle, json!({"status": "authorized"})).await;
    assert_eq!(status, 200, "{retried}");
    assert_eq!(retried, first, "a retry returns the original answer");
}

/// Every instant the API writes is an RFC 3339 date-time (four-digit years): a grant that would
/// expire after 9999 is refused. A fraction of an hour or minute is exact elapsed time, as the
/// schema's pattern allows.
async fn expiries_are_rfc3339_instants_and_may_be_fractions_of_an_hour(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("far").await;
    let grants = format!("{}/credits/grants", customer_path(&c));
    let too_far = grant_body("1", json!({"expires_after": "P10000Y"}));
    ledger.call(reqwest::Method::POST, &grants).json(&too_far).send().await.assert_problem(400, Some("expires_after"));
    let start = "2030-01-01T00:00:00Z";
    for (duration, expires) in [("PT1.5H", "2030-01-01T01:30:00Z"), ("PT0.5M", "2030-01-01T00:00:30Z")] {
        let body = grant_body("1", json!({"effective_at": start, "expires_after": duration}));
        let (status, g) = ledger.post(&grants, body).await;
        assert_eq!(status, 201, "{duration}: {g}");
        assert_eq!(g["expires_at"], expires, "{duration}");
    }
    let body = grant_body("1", json!({"effective_at": start, "expires_after": "P1.5D"}));
    ledger.call(reqwest::Method::POST, &grants).json(&body).send().await.assert_problem(400, Some("expires_after"));
}

/// A void takes the whole unused remainder and no body. "Bodies are JSON; unknown fields are
/// refused": a body with a member (an `amount`, as if part of a grant could be voided) is refused
/// naming it and voids nothing, as is one not declared JSON; none at all, or `{}`, voids.
async fn a_void_refuses_a_body_it_would_ignore(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("partial").await;
    let g = ledger.grant(&c, grant_body("10", json!({}))).await;
    let void = |id: &str| format!("{}/{id}/void", grants_path(&c));
    let before = ledger.snapshot(&c).await;
    for (body, field) in [(json!({"amount": "5"}), "amount"), (json!({"reason": "churn"}), "reason")] {
        let reply = ledger.call(reqwest::Method::POST, &void(&id_of(&g))).json(&body).send().await;
        reply.assert_problem(400, Some(field));
    }
    let reply = ledger
        .call(reqwest::Method::POST, &void(&id_of(&g)))
        .body(Some("application/x-www-form-urlencoded"), "amount=5")
        .send()
        .await;
    reply.assert_problem(400, Some("Content-Type"));
    assert_eq!(ledger.snapshot(&c).await, before, "nothing voided");

    let reply = ledger.call(reqwest::Method::POST, &void(&id_of(&g))).send().await;
    assert_eq!((reply.status, &reply.body["status"]), (200, &json!("voided")), "{}", reply.body);
    let other = ledger.grant(&c, grant_body("3", json!({}))).await;
    let (status, body) = ledger.post(&void(&id_of(&other)), json!({})).await;
    assert_eq!((status, &body["status"]), (200, &json!("voided")), "{body}");
    assert_eq!(ledger.balance(&c, "").await.0, "0");
    ledger.assert_journal_sound().await;
}

on_both_backends!(
    a_void_refuses_a_body_it_would_ignore,
    re_sending_the_same_settlement_status_changes_nothing,
    expiries_are_rfc3339_instants_and_may_be_fractions_of_an_hour,
    grant_defaults_purchase_terms_and_round_trip,
    grant_expiry_follows_the_iso_duration_on_the_calendar,
    future_grant_is_pending_until_it_becomes_effective,
    grant_keys_are_unique_per_customer,
    grant_list_filters_by_status_currency_and_key_and_paginates,
    external_settlement_updates_only_external_grants,
    void_removes_the_unused_remainder_and_keeps_history,
);
