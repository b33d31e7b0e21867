//! `…/credits/balance` (points in time, currency and feature scope, expiry without a background
//! job) and `…/credits/transactions` (items, filters, stable cursor pagination).

mod support;

use base64::Engine as _;
use serde_json::{json, Value};
use support::{column, customer_path, data, enc, grant_body, shift, Backend, Ledger, TestDb};

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_owned()
}

fn at(t: &str) -> String {
    format!("?timestamp={}", enc(t))
}

fn cursor(text: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

async fn charge_ok(ledger: &Ledger, customer: &str, body: Value) -> Value {
    let (status, reply) = ledger.charge_with(customer, body).await;
    assert_eq!(status, 201, "{reply}");
    reply
}

fn charge_body(amount: &str, key: &str, extra: Value) -> Value {
    support::merged(json!({"amount": amount, "currency": "USD", "settlement_mode": "credit_only", "key": key}), extra)
}

/// (currency, settled) of each balance.
fn settled(balances: &Value) -> Vec<(String, String)> {
    balances
        .as_array()
        .expect("balances")
        .iter()
        .map(|b| (b["currency"].as_str().unwrap_or("?").to_owned(), b["settled"].as_str().unwrap_or("?").to_owned()))
        .collect()
}

async fn balance_at_points_in_time(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("historian").await;
    ledger.grant(&c, grant_body("100", json!({}))).await;
    let funded_at = ledger.all_transactions(&c).await[0]["booked_at"].as_str().expect("booked_at").to_owned();
    ledger.wait_past(&funded_at).await;
    let first = charge_ok(&ledger, &c, charge_body("30", "first", json!({}))).await;
    let first_at = first["created_at"].as_str().expect("created_at").to_owned();
    ledger.wait_past(&first_at).await;
    let second = charge_ok(&ledger, &c, charge_body("12.5", "second", json!({}))).await;
    let second_at = second["created_at"].as_str().expect("created_at").to_owned();

    assert_eq!(ledger.balance(&c, "").await, ("57.5".into(), "57.5".into(), "0".into()));
    for (t, expected) in [
        (funded_at.clone(), "100"),
        (shift(&first_at, -1), "100"),
        (first_at.clone(), "70"),
        (shift(&second_at, -1), "70"),
        (second_at.clone(), "57.5"),
        ("2100-01-01T00:00:00Z".to_owned(), "57.5"),
    ] {
        assert_eq!(ledger.settled_at(&c, &t).await, expected, "at {t}");
    }
    // The same instant written with an offset.
    let offset = support::parse_time(&first_at)
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).expect("offset"))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    assert!(offset.ends_with("+02:00"), "{offset}");
    assert_eq!(ledger.settled_at(&c, &offset).await, "70");
    // Before the customer had anything there is no balance at all.
    assert_eq!(ledger.balances(&c, &at("2000-01-01T00:00:00Z")).await, json!([]));
    let (status, body) = ledger.get(&format!("{}/credits/balance", customer_path(&c))).await;
    assert_eq!(status, 200);
    assert!(support::parse_time(body["retrieved_at"].as_str().unwrap_or("")) >= support::parse_time(&second_at));
    ledger.assert_journal_sound().await;
}

async fn balance_filters_by_currency_and_feature_scope(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("scoped").await;
    ledger.grant(&c, grant_body("10", json!({}))).await;
    ledger.grant(&c, grant_body("20", json!({"filters": {"features": ["api_requests"]}}))).await;
    ledger.grant(&c, grant_body("30", json!({"filters": {"features": ["tokens", "images"]}}))).await;
    ledger.grant(&c, grant_body("5", json!({"currency": "EUR"}))).await;
    ledger.grant(&c, grant_body("7", json!({"currency": "GBP"}))).await;
    assert_eq!(
        ledger.balances(&c, "").await,
        json!([
            {"currency": "EUR", "settled": "5", "live": "5", "pending": "0"},
            {"currency": "GBP", "settled": "7", "live": "7", "pending": "0"},
            {"currency": "USD", "settled": "60", "live": "60", "pending": "0"},
        ])
    );
    let usd = |v: &str| vec![("USD".to_owned(), v.to_owned())];
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("?filter[currency]=USD", usd("60")),
        ("?filter[currency][eq]=USD", usd("60")),
        ("?filter[currency][eq]=JPY", vec![]),
        ("?filter[currency][oeq]=USD,EUR", vec![("EUR".into(), "5".into()), ("USD".into(), "60".into())]),
        ("?filter[currency][neq]=USD", vec![("EUR".into(), "5".into()), ("GBP".into(), "7".into())]),
        (
            "?filter[feature_key][eq]=api_requests",
            vec![("EUR".into(), "5".into()), ("GBP".into(), "7".into()), ("USD".into(), "30".into())],
        ),
        ("?filter[currency][eq]=USD&filter[feature_key]=tokens", usd("40")),
        ("?filter[currency][eq]=USD&filter[feature_key][eq]=images", usd("40")),
        ("?filter[currency][eq]=USD&filter[feature_key][eq]=other", usd("10")),
        ("?filter[currency][eq]=USD&filter[feature_key][neq]=api_requests", usd("40")),
        ("?filter[currency][eq]=USD&filter[feature_key][neq]=tokens", usd("60")),
        ("?filter[currency][eq]=USD&filter[feature_key][oeq]=api_requests,images", usd("60")),
        ("?filter[currency][eq]=USD&filter[feature_key][contains]=oken", usd("40")),
        ("?filter[currency][eq]=USD&filter[feature_key][ocontains]=api,ima", usd("60")),
        ("?filter[currency][eq]=USD&filter[feature_key][contains]=zzz", usd("10")),
    ];
    for (query, expected) in &cases {
        assert_eq!(&settled(&ledger.balances(&c, query).await), expected, "{query}");
    }
    // Usage moves between scopes: unrestricted credit is drawn first here (creation order).
    charge_ok(&ledger, &c, charge_body("15", "api", json!({"feature_key": "api_requests"}))).await;
    for (query, expected) in [
        ("", "45"),
        ("&filter[feature_key][eq]=api_requests", "15"),
        ("&filter[feature_key][eq]=tokens", "30"),
        ("&filter[feature_key][eq]=other", "0"),
    ] {
        let balances = ledger.balances(&c, &format!("?filter[currency][eq]=USD{query}")).await;
        assert_eq!(settled(&balances), usd(expected), "{query}");
    }

    // Konnect's schema takes any text as a filter value: one that is no feature key or currency
    // matches no feature (only unrestricted credit counts) or no currency; operators combine.
    for (query, expected) in [
        ("?filter[feature_key][eq]=Bad-Key", "0"),
        ("?filter[feature_key][oeq]=tokens,BAD", "30"),
        ("?filter[feature_key][neq]=a__b", "45"),
        ("?filter[feature_key][eq]=tokens&filter[feature_key][neq]=b", "30"),
        ("?filter[feature_key][eq]=tokens&filter[feature_key][neq]=tokens", "0"),
    ] {
        let balances = ledger.balances(&c, &format!("{query}&filter[currency][oeq]=USD,eur")).await;
        assert_eq!(settled(&balances), usd(expected), "{query}");
    }
    for query in ["?filter[currency][eq]=usd", "?filter[currency]=US"] {
        assert_eq!(ledger.balances(&c, query).await, json!([]), "{query}");
    }
    for (query, field) in [
        ("?filter[currency][contains]=US", "filter[currency][contains]"),
        ("?timestamp=yesterday", "timestamp"),
        ("?timestamp=2026-01-01", "timestamp"),
        ("?timestamp=", "timestamp"),
        ("?page[size]=1", "page[size]"),
        ("?filter[grant]=x", "filter[grant]"),
    ] {
        let reply =
            ledger.call(reqwest::Method::GET, &format!("{}/credits/balance{query}", customer_path(&c))).send().await;
        reply.assert_problem(400, Some(field));
    }
    ledger.assert_journal_sound().await;
}

async fn expiry_is_seen_at_its_instant_without_a_background_job(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("expiring").await;
    // Two seconds leave room to charge before the expiry even on a loaded machine.
    let a = ledger.grant(&c, grant_body("10", json!({"expires_after": "PT2S"}))).await;
    let b = ledger.grant(&c, grant_body("5", json!({}))).await;
    let charged = charge_ok(&ledger, &c, charge_body("3", "early", json!({}))).await;
    assert_eq!(charged["consumed"], json!([{"grant_id": id_of(&a), "amount": "3"}]), "expiring credit first");
    let expires = a["expires_at"].as_str().expect("expires_at").to_owned();
    // Asked about the future, the balance already knows what expires; asking books nothing.
    assert_eq!(ledger.settled_at(&c, &shift(&expires, -1)).await, "12");
    assert_eq!(ledger.settled_at(&c, &expires).await, "5");
    assert_eq!(ledger.settled_at(&c, &shift(&expires, 3_600_000_000)).await, "5");
    assert_eq!(ledger.row_counts().await["movements"], 3);

    ledger.wait_past(&expires).await; // no expiry job runs in this process
    assert_eq!(ledger.balance(&c, "").await, ("5".into(), "5".into(), "0".into()));
    assert_eq!(ledger.settled_at(&c, &shift(&expires, -1)).await, "12");
    assert_eq!(ledger.settled_at(&c, &expires).await, "5");
    let (_, grant) = ledger.get(&format!("{}/credits/grants/{}", customer_path(&c), id_of(&a))).await;
    assert_eq!(grant["status"], "expired");
    let (status, refused) = ledger.charge(&c, "6", "too-late").await;
    assert_eq!(status, 402, "{refused}");
    assert_eq!(refused["available"], "5");
    assert_eq!(ledger.row_counts().await["movements"], 3, "reading and refusing book nothing");

    // The history books the expiry at its own instant, of the unused 7 only.
    let expired = ledger.transactions(&c, "?filter[type]=expired").await;
    assert_eq!(data(&expired).len(), 1, "{expired}");
    let e = &data(&expired)[0];
    assert_eq!(e["amount"], "-7");
    assert_eq!(e["grant_id"], json!(id_of(&a)));
    assert_eq!(e["booked_at"], json!(expires));
    assert_eq!(e["available_balance"], json!({"before": "12", "after": "5"}));
    assert_eq!(ledger.all_transactions(&c).await.len(), 4);
    // The journal now answers the past.
    assert_eq!(ledger.settled_at(&c, &shift(&expires, -1)).await, "12");
    assert_eq!(ledger.settled_at(&c, &expires).await, "5");
    let paid = charge_ok(&ledger, &c, charge_body("5", "last", json!({}))).await;
    assert_eq!(paid["consumed"], json!([{"grant_id": id_of(&b), "amount": "5"}]));
    ledger.assert_journal_sound().await;
}

async fn transactions_show_every_movement_with_its_details(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("detailed").await;
    let u = ledger.grant(&c, grant_body("100", json!({}))).await;
    let r = ledger.grant(&c, grant_body("50", json!({"priority": 1, "filters": {"features": ["tokens"]}}))).await;
    let e = ledger.grant(&c, grant_body("20", json!({"currency": "EUR"}))).await;
    charge_ok(
        &ledger,
        &c,
        charge_body(
            "10",
            "tok",
            json!({"feature_key": "tokens", "name": "Token call", "description": "tokens", "labels": {"req": "r1"}}),
        ),
    )
    .await;
    charge_ok(&ledger, &c, charge_body("5", "plain", json!({}))).await;
    charge_ok(&ledger, &c, charge_body("2", "euro", json!({"currency": "EUR"}))).await;
    ledger.adjust(&c, json!({"name": "Bonus", "currency": "USD", "amount": "3"})).await;
    ledger.adjust(&c, json!({"name": "Fix", "currency": "USD", "amount": "-1"})).await;

    let items = ledger.all_transactions(&c).await;
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let got: Vec<[String; 7]> = items
        .iter()
        .map(|t| {
            [
                s(&t["type"]),
                s(&t["amount"]),
                s(&t["currency"]),
                s(&t["grant_id"]),
                s(&t["available_balance"]["before"]),
                s(&t["available_balance"]["after"]),
                s(&t["name"]),
            ]
        })
        .collect();
    let bonus_grant = s(&items[1]["grant_id"]);
    let row = |v: [&str; 7]| v.map(str::to_owned);
    assert_eq!(
        got,
        vec![
            row(["consumed", "-1", "USD", &id_of(&u), "138", "137", "Fix"]),
            row(["funded", "3", "USD", &bonus_grant, "135", "138", "Bonus"]),
            row(["consumed", "-2", "EUR", &id_of(&e), "20", "18", "Charge"]),
            row(["consumed", "-5", "USD", &id_of(&u), "140", "135", "Charge"]),
            row(["consumed", "-10", "USD", &id_of(&r), "150", "140", "Token call"]),
            row(["funded", "20", "EUR", &id_of(&e), "0", "20", "Credits funded"]),
            row(["funded", "50", "USD", &id_of(&r), "100", "150", "Credits funded"]),
            row(["funded", "100", "USD", &id_of(&u), "0", "100", "Credits funded"]),
        ]
    );
    assert!(![id_of(&u), id_of(&r), id_of(&e)].contains(&bonus_grant));
    let token_call = &items[4];
    assert_eq!(token_call["feature_key"], "tokens");
    assert_eq!(token_call["labels"], json!({"req": "r1"}));
    assert_eq!(token_call["description"], "tokens");
    let mut ids = std::collections::BTreeSet::new();
    for t in &items {
        let id = s(&t["id"]);
        assert!(ledger::api::request::ulid_param("id", &id).is_ok(), "{t}");
        assert!(ids.insert(id), "ids are unique");
        support::parse_time(t["booked_at"].as_str().unwrap_or(""));
        support::parse_time(t["created_at"].as_str().unwrap_or(""));
        assert!(t["labels"].is_object(), "{t}");
    }
    assert_eq!(items[7]["labels"], json!({}));

    let cases: &[(&str, &[&str])] = &[
        ("?filter[type]=funded", &["3", "20", "50", "100"]),
        ("?filter[type]=consumed", &["-1", "-2", "-5", "-10"]),
        ("?filter[type]=expired", &[]),
        ("?filter[currency]=EUR", &["-2", "20"]),
        ("?filter[type]=consumed&filter[currency]=USD", &["-1", "-5", "-10"]),
        // A feature's movements are those of the credit usable for it: unrestricted grants and
        // the grant restricted to tokens (its funding included).
        ("?filter[feature_key]=tokens", &["-1", "3", "-2", "-5", "-10", "20", "50", "100"]),
        ("?filter[feature_key][eq]=tokens", &["-1", "3", "-2", "-5", "-10", "20", "50", "100"]),
        ("?filter[feature_key][oeq]=tokens,images", &["-1", "3", "-2", "-5", "-10", "20", "50", "100"]),
        ("?filter[feature_key][contains]=tok", &["-1", "3", "-2", "-5", "-10", "20", "50", "100"]),
        ("?filter[feature_key][ocontains]=zz,ok", &["-1", "3", "-2", "-5", "-10", "20", "50", "100"]),
        ("?filter[feature_key][neq]=tokens", &["-1", "3", "-2", "-5", "20", "100"]),
        ("?filter[feature_key][eq]=images", &["-1", "3", "-2", "-5", "20", "100"]),
        ("?filter[feature_key][eq]=images&filter[feature_key][contains]=ima", &["-1", "3", "-2", "-5", "20", "100"]),
        ("?filter[type]=funded&filter[feature_key][eq]=tokens&filter[currency]=USD", &["3", "50", "100"]),
    ];
    for (query, expected) in cases {
        assert_eq!(column(&ledger.transactions(&c, query).await, "amount"), expected.to_vec(), "{query}");
    }
    for (query, field) in [
        ("?filter[type]=voided", "filter[type]"),
        ("?filter[type]=adjusted", "filter[type]"),
        ("?filter[currency]=eur", "filter[currency]"),
        ("?filter[currency][eq]=EUR", "filter[currency][eq]"),
        ("?filter[feature_key][like]=tok", "filter[feature_key][like]"),
        ("?sort=booked_at", "sort"),
        ("?page[number]=2", "page[number]"),
    ] {
        let reply = ledger
            .call(reqwest::Method::GET, &format!("{}/credits/transactions{query}", customer_path(&c)))
            .send()
            .await;
        reply.assert_problem(400, Some(field));
    }
    ledger.assert_journal_sound().await;
}

async fn page(ledger: &Ledger, link: &str) -> Value {
    let (status, body) = ledger.get(link).await;
    assert_eq!(status, 200, "{link}: {body}");
    body
}

fn afters(body: &Value) -> Vec<String> {
    data(body).iter().map(|t| t["available_balance"]["after"].as_str().unwrap_or("?").to_owned()).collect()
}

fn link(body: &Value, which: &str) -> String {
    body["meta"]["page"][which].as_str().unwrap_or_else(|| panic!("no {which} link in {body}")).to_owned()
}

async fn transaction_cursors_stay_stable_while_new_movements_arrive(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("pager").await;
    ledger.grant(&c, grant_body("1000", json!({}))).await;
    for i in 1..=7 {
        charge_ok(&ledger, &c, charge_body("1", &format!("c{i}"), json!({}))).await;
    }
    // Eight movements; the balance after each identifies it: funded → 1000, charge i → 1000 - i.
    let first = ledger.transactions(&c, "?page[size]=3").await;
    assert_eq!(afters(&first), vec!["993", "994", "995"]);
    assert_eq!(first["meta"]["page"]["size"], 3);
    assert!(first["meta"]["page"]["previous"].is_null(), "{first}");
    let next1 = link(&first, "next");
    assert!(next1.starts_with(&format!("{}/credits/transactions?", customer_path(&c))), "{next1}");

    // New movements arrive while a client pages through.
    charge_ok(&ledger, &c, charge_body("1", "c8", json!({}))).await;
    charge_ok(&ledger, &c, charge_body("1", "c9", json!({}))).await;
    let second = page(&ledger, &next1).await;
    assert_eq!(afters(&second), vec!["996", "997", "998"]);
    let third = page(&ledger, &link(&second, "next")).await;
    assert_eq!(afters(&third), vec!["999", "1000"]);
    assert!(third["meta"]["page"]["next"].is_null(), "{third}");
    let mut seen: Vec<String> = [&first, &second, &third].iter().flat_map(|p| column(p, "id")).collect();
    assert_eq!(seen.len(), 8);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 8, "nothing duplicated, nothing skipped");

    // Backwards: the same pages, and then the movements that arrived meanwhile.
    let back = page(&ledger, &link(&third, "previous")).await;
    assert_eq!(column(&back, "id"), column(&second, "id"));
    let back = page(&ledger, &link(&second, "previous")).await;
    assert_eq!(afters(&back), vec!["993", "994", "995"]);
    let newest = page(&ledger, &link(&back, "previous")).await;
    assert_eq!(afters(&newest), vec!["991", "992"]);
    assert!(newest["meta"]["page"]["previous"].is_null(), "{newest}");
    assert_eq!(afters(&page(&ledger, &link(&newest, "next")).await), vec!["993", "994", "995"]);

    // Filters travel with the links.
    let consumed = ledger.transactions(&c, "?filter[type]=consumed&page[size]=4").await;
    assert_eq!(afters(&consumed), vec!["991", "992", "993", "994"]);
    let next = link(&consumed, "next");
    assert!(next.contains("filter%5Btype%5D=consumed"), "{next}");
    let consumed = page(&ledger, &next).await;
    assert_eq!(afters(&consumed), vec!["995", "996", "997", "998"]);
    let consumed = page(&ledger, &link(&consumed, "next")).await;
    assert_eq!(afters(&consumed), vec!["999"]);
    assert!(consumed["meta"]["page"]["next"].is_null(), "{consumed}");

    // Past the oldest movement (the first in this database): an empty page that links back.
    let empty = ledger.transactions(&c, &format!("?page[after]={}", cursor("c1:1"))).await;
    assert_eq!(data(&empty).len(), 0);
    assert!(empty["meta"]["page"]["next"].is_null());
    assert!(empty["meta"]["page"]["previous"].is_string(), "{empty}");
    assert_eq!(data(&ledger.transactions(&c, "?page[size]=1000").await).len(), 10);

    let valid = cursor("c1:3");
    for (query, field) in [
        ("?page[after]=!!!".to_owned(), "page[after]"),
        (format!("?page[after]={}", cursor("c1:-5")), "page[after]"),
        (format!("?page[after]={}", cursor("c2:5")), "page[after]"),
        (format!("?page[after]={}", cursor("c1:x")), "page[after]"),
        ("?page[before]=garbage".to_owned(), "page[before]"),
        (format!("?page[after]={valid}&page[before]={valid}"), "page[before]"),
        ("?page[size]=x".to_owned(), "page[size]"),
    ] {
        let reply = ledger
            .call(reqwest::Method::GET, &format!("{}/credits/transactions{query}", customer_path(&c)))
            .send()
            .await;
        reply.assert_problem(400, Some(field));
    }
    ledger.assert_journal_sound().await;
}

on_both_backends!(
    balance_at_points_in_time,
    balance_filters_by_currency_and_feature_scope,
    expiry_is_seen_at_its_instant_without_a_background_job,
    transactions_show_every_movement_with_its_details,
    transaction_cursors_stay_stable_while_new_movements_arrive,
);
