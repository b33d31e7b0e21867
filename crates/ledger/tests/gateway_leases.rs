//! `POST /v3/gateway/sync`, lease side: opening, topping up, renewing, releasing and re-opening
//! leases; exactness under concurrent lease requests and charges (one instance, and two on one
//! PostgreSQL database); usage captured against leases; expiry without a job and the expiry pass
//! closing an expired lease exactly once.

mod support;

use credits::Amount;
use serde_json::{json, Value};
use support::{
    amount, grant_body, lease_request, merged, parse_time, row, subject_sync, summary, usage_range, Backend, Ledger,
    TestDb,
};

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_owned()
}

const MINUTE_MS: u64 = 60_000;

/// A sync by node `n` asking about one lease of `subject`.
async fn lease(ledger: &Ledger, subject: &str, request: Value) -> Value {
    let answer = ledger.sync_one("n", subject_sync(subject, json!({ "lease": request }))).await;
    assert_eq!(answer["status"], "ok", "{answer}");
    answer
}

/// The lease answer's `(held, granted, closed)`.
fn held_granted_closed(answer: &Value) -> (&str, &str, bool) {
    let l = &answer["lease"];
    (
        l["held"].as_str().unwrap_or_else(|| panic!("no lease in {answer}")),
        l["granted"].as_str().unwrap_or("?"),
        l["closed"].as_bool().unwrap_or_else(|| panic!("no closed in {answer}")),
    )
}

fn expires_at(answer: &Value) -> chrono::DateTime<chrono::Utc> {
    parse_time(answer["lease"]["expires_at"].as_str().unwrap_or_else(|| panic!("no expires_at in {answer}")))
}

fn balance(settled: &str, live: &str) -> (String, String, String) {
    (settled.into(), live.into(), "0".into())
}

async fn leases_open_top_up_renew_release_and_reopen(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("leaser").await;
    ledger.grant(&c, grant_body("10.00", json!({}))).await;
    let subject = "leaser-subject";

    let (status, body) = ledger
        .sync(json!({"node": "n", "subjects": [subject_sync(subject, json!({"lease": lease_request("L", 1, "4.00", MINUTE_MS)}))]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let opened = &body["subjects"][0];
    assert_eq!(opened["status"], "ok", "{opened}");
    assert_eq!(opened["customer_id"], json!(c));
    assert!(opened.get("usage").is_none(), "{opened}");
    assert_eq!(opened["lease"]["lease_id"], "L");
    assert_eq!(held_granted_closed(opened), ("4.00", "4.00", false));
    assert_eq!(opened["live"], "6.00");
    let server_time = parse_time(body["server_time"].as_str().expect("server_time"));
    let ttl = chrono::TimeDelta::milliseconds(MINUTE_MS as i64);
    assert!(expires_at(opened) > server_time && expires_at(opened) <= server_time + ttl, "{body}");
    // Held credit stays settled but is not live.
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "6.00"));
    assert_eq!(ledger.lease_row("L").await, Some((c.clone(), "4.00".into(), false)));

    // Top-ups add what is asked, up to what is live.
    let topped = lease(&ledger, subject, lease_request("L", 2, "3.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&topped), topped["live"].as_str()), (("7.00", "3.00", false), Some("3.00")));
    let topped = lease(&ledger, subject, lease_request("L", 3, "5.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&topped), topped["live"].as_str()), (("10.00", "3.00", false), Some("0.00")));
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "0.00"));

    // A retry (a request number already applied) adds nothing but renews the TTL.
    // (Past the instant of the last top-up, so that a renewed expiry is a later one.)
    ledger.wait_past(&support::format_time(expires_at(&topped) - ttl)).await;
    let retry = lease(&ledger, subject, lease_request("L", 3, "5.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&retry), ("10.00", "0", false), "{retry}");
    assert!(expires_at(&retry) > expires_at(&topped), "renewed: {topped} then {retry}");
    // So is an older request arriving late; a renewal asks for nothing.
    let stale = lease(&ledger, subject, lease_request("L", 2, "3.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&stale), ("10.00", "0", false), "{stale}");
    let renewal = lease(&ledger, subject, lease_request("L", 3, "0", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&renewal), ("10.00", "0", false), "{renewal}");
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "0.00"));

    // A release with a number already applied was overtaken by a later request: ignored.
    let mut overtaken = lease_request("L", 3, "0", MINUTE_MS);
    overtaken["release"] = json!(true);
    let kept = lease(&ledger, subject, overtaken).await;
    assert_eq!(held_granted_closed(&kept), ("10.00", "0", false), "{kept}");
    // Release (a new number) returns the remainder to live; releasing again changes nothing.
    let mut release = lease_request("L", 4, "0", MINUTE_MS);
    release["release"] = json!(true);
    let released = lease(&ledger, subject, release.clone()).await;
    assert_eq!(held_granted_closed(&released), ("0", "0", true), "{released}");
    assert_eq!(released["live"], "10.00");
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "10.00"));
    assert_eq!(ledger.lease_row("L").await.map(|r| r.2), Some(true), "closed in the store");
    let again = lease(&ledger, subject, release.clone()).await;
    assert_eq!((held_granted_closed(&again), again["live"].as_str()), (("0", "0", true), Some("10.00")));

    // The id can be opened again: carved anew out of what is live.
    let reopened = lease(&ledger, subject, lease_request("L", 5, "2.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&reopened), reopened["live"].as_str()), (("2.00", "2.00", false), Some("8.00")));
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "8.00"));
    assert_eq!(ledger.lease_row("L").await, Some((c.clone(), "2.00".into(), false)));

    ledger.assert_journal_sound().await;
}

async fn a_lease_id_of_another_customer_gets_no_credit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("owner").await;
    ledger.grant(&c, grant_body("10.00", json!({}))).await;
    let opened = lease(&ledger, "owner-subject", lease_request("L", 1, "2.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&opened), ("2.00", "2.00", false));
    let other = ledger.customer("other").await;
    ledger.grant(&other, grant_body("5.00", json!({}))).await;
    let foreign = |seq: u64| {
        subject_sync(
            "other-subject",
            json!({"usage": usage_range(seq, seq + 1, "1.00", "credit_only"), "lease": lease_request("L", seq, "1.00", MINUTE_MS)}),
        )
    };
    let answer = ledger.sync_one("n", foreign(5)).await;
    // The other customer gets no credit out of the id, and the owner's lease is untouched ...
    assert_eq!(ledger.lease_row("L").await, Some((c.clone(), "2.00".into(), false)), "{answer}");
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "8.00"));
    assert_eq!(answer["status"], "ok", "{answer}");
    assert_eq!(answer["lease"]["closed"], true, "{answer}");
    assert_eq!(answer["lease"]["granted"], "0", "{answer}");
    // ... but the usage it reports is booked all the same: served calls are never dropped.
    assert_eq!(answer["usage"], "booked", "{answer}");
    assert_eq!(ledger.balance(&other, "").await, balance("4.00", "4.00"));
    let own = lease(&ledger, "owner-subject", lease_request("L", 1, "0", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&own), ("2.00", "0", false), "{own}");
    // Also once the owner released it: the id stays the owner's.
    let mut release = lease_request("L", 2, "0", MINUTE_MS);
    release["release"] = json!(true);
    lease(&ledger, "owner-subject", release).await;
    let answer = ledger.sync_one("n", foreign(6)).await;
    assert_eq!(answer["lease"]["closed"], true, "{answer}");
    assert_eq!(ledger.lease_row("L").await, Some((c.clone(), "0".into(), true)));
    assert_eq!(ledger.balance(&other, "").await, balance("3.00", "3.00"));
    ledger.assert_journal_sound().await;
}

async fn leases_never_hold_more_than_is_live(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("small").await;
    ledger.grant(&c, grant_body("3.00", json!({}))).await;
    let subject = "small-subject";
    let first = lease(&ledger, subject, lease_request("A", 1, "5.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&first), first["live"].as_str()), (("3.00", "3.00", false), Some("0.00")));
    let second = lease(&ledger, subject, lease_request("B", 1, "1.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&second), second["live"].as_str()), (("0.00", "0.00", false), Some("0.00")));
    let top_up = lease(&ledger, subject, lease_request("A", 2, "1.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&top_up), ("3.00", "0.00", false), "{top_up}");
    // A charge cannot spend what the leases hold.
    let (status, refusal) = ledger.charge(&c, "0.01", "while-held").await;
    assert_eq!(status, 402, "{refusal}");
    // Credit released by one lease can go to another.
    let mut release = lease_request("A", 3, "0", MINUTE_MS);
    release["release"] = json!(true);
    lease(&ledger, subject, release).await;
    let second = lease(&ledger, subject, lease_request("B", 2, "1.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&second), second["live"].as_str()), (("1.00", "1.00", false), Some("2.00")));
    assert_eq!(ledger.balance(&c, "").await, balance("3.00", "2.00"));
    ledger.assert_journal_sound().await;
}

/// A lease granted less than it asked (or a charge refused) recalls the customer's other open leases: each holder's
/// answers say so (stored: every later sync of it repeats it) until the lease closes; the lease
/// that asked, and a lease opened again after its release, are not recalled.
async fn a_lease_granted_less_than_it_wants_recalls_the_others(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("recall").await;
    ledger.grant(&c, grant_body("3.00", json!({}))).await;
    let subject = "recall-subject";
    let recalled = |answer: &Value| answer["lease"].get("recalled").and_then(Value::as_bool).unwrap_or(false);
    let a = lease(&ledger, subject, lease_request("A", 1, "2.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&a), recalled(&a)), (("2.00", "2.00", false), false), "{a}");
    let b = lease(&ledger, subject, lease_request("B", 1, "0.50", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&b), recalled(&b)), (("0.50", "0.50", false), false), "enough was live: {b}");
    let a = lease(&ledger, subject, lease_request("A", 1, "0", MINUTE_MS)).await;
    assert!(!recalled(&a), "no one was refused: {a}");
    // B wants more than is live: A (and only A) is recalled, from its next answer on.
    let b = lease(&ledger, subject, lease_request("B", 2, "1.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&b), recalled(&b)), (("1.00", "0.50", false), false), "{b}");
    for _ in 0..2 {
        let a = lease(&ledger, subject, lease_request("A", 1, "0", MINUTE_MS)).await;
        assert_eq!((held_granted_closed(&a), recalled(&a)), (("2.00", "0", false), true), "{a}");
    }
    // A gives it back; B's next top-up gets the credit; A opened again is not recalled.
    let mut release = lease_request("A", 2, "0", MINUTE_MS);
    release["release"] = json!(true);
    assert!(held_granted_closed(&lease(&ledger, subject, release).await).2);
    let b = lease(&ledger, subject, lease_request("B", 3, "1.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&b), ("2.00", "1.00", false), "{b}");
    let a = lease(&ledger, subject, lease_request("A", 3, "0.50", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&a), recalled(&a)), (("0.50", "0.50", false), false), "{a}");
    // A charge the live balance does not cover recalls the leases too (and is refused).
    let (status, refusal) = ledger.charge(&c, "1.00", "recalling").await;
    assert_eq!(status, 402, "{refusal}");
    for (id, seq) in [("A", 3), ("B", 3)] {
        let answer = lease(&ledger, subject, lease_request(id, seq, "0", MINUTE_MS)).await;
        assert!(recalled(&answer), "{answer}");
    }
    assert_eq!(ledger.balance(&c, "").await, balance("3.00", "0.50"));
    ledger.assert_journal_sound().await;
}

/// 20 nodes each open a lease wanting 1.00 while 3 charges of 1.00 arrive, against 5.00, spread
/// over `ledgers`: all leases and charges together take exactly the balance, never more.
async fn leases_and_charges_race_for_five(ledgers: &[&Ledger]) {
    let c = ledgers[0].customer("racer").await;
    ledgers[0].grant(&c, grant_body("5.00", json!({}))).await;
    let mut leases = Vec::new();
    for i in 0..20 {
        let ledger = ledgers[i % ledgers.len()];
        let (http, url) = (ledger.http.clone(), ledger.url("/v3/gateway/sync"));
        let body = json!({"node": format!("node-{i}"), "subjects": [subject_sync("racer-subject", json!({"lease": lease_request(&format!("lease-{i}"), 1, "1.00", MINUTE_MS)}))]});
        leases.push(tokio::spawn(async move {
            let resp = http.post(url).bearer_auth(support::TOKEN).json(&body).send().await.expect("request");
            assert_eq!(resp.status().as_u16(), 200);
            let body: Value = resp.json().await.expect("json");
            body["subjects"][0].clone()
        }));
    }
    let mut charges = Vec::new();
    for i in 0..3 {
        let ledger = ledgers[i % ledgers.len()];
        let (http, url) = (ledger.http.clone(), ledger.url(&format!("/v3/openmeter/customers/{c}/credits/charges")));
        let body = json!({"amount": "1.00", "currency": "USD", "settlement_mode": "credit_only", "key": format!("charge-{i}")});
        charges.push(tokio::spawn(async move {
            let resp = http.post(url).bearer_auth(support::TOKEN).json(&body).send().await.expect("request");
            resp.status().as_u16()
        }));
    }
    let mut granted = Amount::ZERO;
    for task in leases {
        let answer = task.await.expect("task");
        assert_eq!(answer["status"], "ok", "{answer}");
        let g = amount(&answer["lease"]["granted"]);
        assert!(g == Amount::ZERO || g == amount(&json!("1.00")), "{answer}");
        assert_eq!(amount(&answer["lease"]["held"]), g, "{answer}");
        assert!(!amount(&answer["live"]).is_negative(), "live never negative: {answer}");
        granted += g;
    }
    let mut charged = Amount::ZERO;
    for task in charges {
        match task.await.expect("task") {
            201 => charged += amount(&json!("1.00")),
            402 => {}
            other => panic!("charge answered {other}"),
        }
    }
    let five = amount(&json!("5.00"));
    assert!(granted <= five, "granted {granted}");
    assert_eq!(granted + charged, five, "granted {granted}, charged {charged}");
    let (settled, live, _) = ledgers[0].balance(&c, "").await;
    assert_eq!((settled, live.as_str()), ((five - charged).to_string(), "0.00"));
    for ledger in ledgers {
        ledger.assert_journal_sound().await;
    }
}

async fn concurrent_leases_and_charges_never_exceed_the_balance(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    leases_and_charges_race_for_five(&[&ledger]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_database_never_lease_more_than_the_balance() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (Ledger::start(&db).await, Ledger::start(&db).await);
    leases_and_charges_race_for_five(&[&a, &b]).await;
}

async fn usage_against_a_lease_is_captured_from_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("capturer").await;
    let b = ledger.grant(&c, grant_body("10.00", json!({"name": "B", "priority": 2}))).await;
    let a = ledger.grant(&c, grant_body("3.00", json!({"name": "A", "priority": 1, "expires_after": "P10D"}))).await;
    let subject = "capturer-subject";
    let opened = lease(&ledger, subject, lease_request("L", 1, "5.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&opened), opened["live"].as_str()), (("5.00", "5.00", false), Some("8.00")));

    // Spent from the lease: booked through the draw-down order, the lease holds less, and what
    // is live does not change (it was set aside already).
    let spent = |from: u64, to: u64, amount: &str, lease_id: &str| {
        let mut range = usage_range(from, to, amount, "credit_only");
        range["lease_id"] = json!(lease_id);
        range
    };
    let captured = ledger.sync_one("n", subject_sync(subject, json!({"usage": spent(0, 4, "1.00", "L")}))).await;
    assert_eq!((captured["usage"].as_str(), captured["live"].as_str()), (Some("booked"), Some("8.00")), "{captured}");
    assert_eq!(
        summary(&ledger.all_transactions(&c).await[..1]),
        vec![row("consumed", "-1.00", &id_of(&a), "13.00", "12.00")],
        "drawn from A (priority 1), which the lease set aside"
    );
    let renewed = lease(&ledger, subject, lease_request("L", 1, "0", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&renewed), renewed["live"].as_str()), (("4.00", "0", false), Some("8.00")));
    assert_eq!(ledger.balance(&c, "").await, balance("12.00", "8.00"));

    // A retried range captures nothing more.
    let retried = ledger.sync_one("n", subject_sync(subject, json!({"usage": spent(0, 4, "1.00", "L")}))).await;
    assert_eq!(retried["usage"], "duplicate", "{retried}");

    // Usage beyond the lease (6.00 against 4.00 held) is booked in full; the lease holds nothing.
    let beyond = ledger
        .sync_one(
            "n",
            subject_sync(
                subject,
                json!({"usage": spent(4, 10, "6.00", "L"), "lease": lease_request("L", 1, "0", MINUTE_MS)}),
            ),
        )
        .await;
    assert_eq!((beyond["usage"].as_str(), beyond["live"].as_str()), (Some("booked"), Some("6.00")), "{beyond}");
    assert_eq!(held_granted_closed(&beyond), ("0.00", "0", false), "{beyond}");
    assert_eq!(
        summary(&ledger.all_transactions(&c).await[..2]),
        vec![
            row("consumed", "-4.00", &id_of(&b), "10.00", "6.00"),
            row("consumed", "-2.00", &id_of(&a), "12.00", "10.00")
        ]
    );
    assert_eq!(ledger.balance(&c, "").await, balance("6.00", "6.00"));
    // An emptied lease can be topped up again.
    let topped = lease(&ledger, subject, lease_request("L", 2, "2.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&topped), topped["live"].as_str()), (("2.00", "2.00", false), Some("4.00")));

    // Late usage after the release is booked all the same (and returns nothing twice).
    let mut release = lease_request("L", 3, "0", MINUTE_MS);
    release["release"] = json!(true);
    let released = lease(&ledger, subject, release).await;
    assert_eq!((held_granted_closed(&released), released["live"].as_str()), (("0", "0", true), Some("6.00")));
    let late = ledger.sync_one("n", subject_sync(subject, json!({"usage": spent(10, 11, "0.50", "L")}))).await;
    assert_eq!((late["usage"].as_str(), late["live"].as_str()), (Some("booked"), Some("5.50")), "{late}");
    assert_eq!(ledger.balance(&c, "").await, balance("5.50", "5.50"));

    // So is usage for a lease whose TTL passed, and for a lease the ledger never saw.
    let short = lease(&ledger, subject, lease_request("S", 1, "1.00", 300)).await;
    assert_eq!((held_granted_closed(&short), short["live"].as_str()), (("1.00", "1.00", false), Some("4.50")));
    ledger.wait_past(&support::format_time(expires_at(&short))).await;
    let expired = ledger.sync_one("n", subject_sync(subject, json!({"usage": spent(11, 12, "0.75", "S")}))).await;
    assert_eq!((expired["usage"].as_str(), expired["live"].as_str()), (Some("booked"), Some("4.75")), "{expired}");
    let unknown =
        ledger.sync_one("n", subject_sync(subject, json!({"usage": spent(12, 13, "0.25", "never-opened")}))).await;
    assert_eq!((unknown["usage"].as_str(), unknown["live"].as_str()), (Some("booked"), Some("4.50")), "{unknown}");
    assert_eq!(ledger.balance(&c, "").await, balance("4.50", "4.50"));
    assert_eq!(
        summary(&ledger.all_transactions(&c).await[..3]),
        vec![
            row("consumed", "-0.25", &id_of(&b), "4.75", "4.50"),
            row("consumed", "-0.75", &id_of(&b), "5.50", "4.75"),
            row("consumed", "-0.50", &id_of(&b), "6.00", "5.50"),
        ]
    );
    assert_eq!(ledger.lease_row("S").await.map(|r| r.2), Some(true), "the expired lease was closed on the way");
    ledger.assert_journal_sound().await;
}

async fn each_lease_captures_the_credit_it_set_aside(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("nodes").await;
    let b = ledger.grant(&c, grant_body("10.00", json!({"name": "B", "priority": 2}))).await;
    let a = ledger.grant(&c, grant_body("3.00", json!({"name": "A", "priority": 1}))).await;
    let subject = "nodes-subject";
    // Node 1's lease sets A aside, node 2's lease then 3.00 of B.
    let one = ledger
        .sync_one("n1", subject_sync(subject, json!({"lease": lease_request("n1/L", 1, "3.00", MINUTE_MS)})))
        .await;
    let two = ledger
        .sync_one("n2", subject_sync(subject, json!({"lease": lease_request("n2/L", 1, "3.00", MINUTE_MS)})))
        .await;
    assert_eq!(
        (held_granted_closed(&one), held_granted_closed(&two)),
        (("3.00", "3.00", false), ("3.00", "3.00", false))
    );
    assert_eq!(two["live"], "7.00");
    let spend = |node: &str, from: u64, amount: &str| {
        let mut range = usage_range(from, from + 1, amount, "credit_only");
        range["lease_id"] = json!(format!("{node}/L"));
        subject_sync(subject, json!({ "usage": range }))
    };
    // Node 1 spent from A: A is consumed (not B, which node 2's lease holds).
    let used = ledger.sync_one("n1", spend("n1", 0, "1.00")).await;
    assert_eq!((used["usage"].as_str(), used["live"].as_str()), (Some("booked"), Some("7.00")), "{used}");
    // Node 2 spent from B.
    let used = ledger.sync_one("n2", spend("n2", 0, "1.00")).await;
    assert_eq!((used["usage"].as_str(), used["live"].as_str()), (Some("booked"), Some("7.00")), "{used}");
    // Node 1 spent 4.00 with 2.00 left in its lease: the rest of A, then free credit of B.
    let used = ledger.sync_one("n1", spend("n1", 1, "4.00")).await;
    assert_eq!((used["usage"].as_str(), used["live"].as_str()), (Some("booked"), Some("5.00")), "{used}");
    assert_eq!(
        summary(&ledger.all_transactions(&c).await[..4]),
        vec![
            row("consumed", "-2.00", &id_of(&b), "9.00", "7.00"),
            row("consumed", "-2.00", &id_of(&a), "11.00", "9.00"),
            row("consumed", "-1.00", &id_of(&b), "12.00", "11.00"),
            row("consumed", "-1.00", &id_of(&a), "13.00", "12.00"),
        ]
    );
    let one =
        ledger.sync_one("n1", subject_sync(subject, json!({"lease": lease_request("n1/L", 1, "0", MINUTE_MS)}))).await;
    let two =
        ledger.sync_one("n2", subject_sync(subject, json!({"lease": lease_request("n2/L", 1, "0", MINUTE_MS)}))).await;
    assert_eq!((held_granted_closed(&one), held_granted_closed(&two)), (("0.00", "0", false), ("2.00", "0", false)));
    assert_eq!(ledger.balance(&c, "").await, balance("7.00", "5.00"));
    ledger.assert_journal_sound().await;
}

async fn leases_in_a_feature_scope_carve_only_credit_the_feature_may_use(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("scoped").await;
    let t = ledger
        .grant(&c, grant_body("5.00", json!({"name": "T", "priority": 1, "filters": {"features": ["tokens"]}})))
        .await;
    ledger.grant(&c, grant_body("5.00", json!({"name": "U", "priority": 2}))).await;
    let subject = "scoped-subject";
    let tokens = |extra: Value| subject_sync(subject, merged(json!({"feature_key": "tokens"}), extra));
    // The tokens lease may use both grants; an unscoped lease only the unrestricted one.
    let scoped = ledger.sync_one("n", tokens(json!({"lease": lease_request("tok", 1, "6.00", MINUTE_MS)}))).await;
    assert_eq!((held_granted_closed(&scoped), scoped["live"].as_str()), (("6.00", "6.00", false), Some("4.00")));
    let plain = lease(&ledger, subject, lease_request("any", 1, "10.00", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&plain), plain["live"].as_str()), (("4.00", "4.00", false), Some("0.00")));
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "0.00"));
    assert_eq!(ledger.balance(&c, "?filter[feature_key][eq]=tokens").await, balance("10.00", "0.00"));
    // Usage of the tokens lease draws T, which that lease set aside.
    let mut range = usage_range(0, 1, "2.00", "credit_only");
    range["lease_id"] = json!("tok");
    let used =
        ledger.sync_one("n", tokens(json!({"usage": range, "lease": lease_request("tok", 1, "0", MINUTE_MS)}))).await;
    assert_eq!((held_granted_closed(&used), used["live"].as_str()), (("4.00", "0", false), Some("0.00")), "{used}");
    let history = ledger.all_transactions(&c).await;
    assert_eq!(summary(&history[..1]), vec![row("consumed", "-2.00", &id_of(&t), "10.00", "8.00")]);
    assert_eq!(history[0]["feature_key"], "tokens");
    assert_eq!(ledger.balance(&c, "").await, balance("8.00", "0.00"));
    ledger.assert_journal_sound().await;
}

async fn an_unrenewed_lease_expires_and_one_pass_closes_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("idle").await;
    ledger.grant(&c, grant_body("10.00", json!({}))).await;
    let broke = ledger.customer("broke").await;
    let held = lease(&ledger, "idle-subject", lease_request("I", 1, "4.00", 300)).await;
    assert_eq!((held_granted_closed(&held), held["live"].as_str()), (("4.00", "4.00", false), Some("6.00")));
    // A lease that holds nothing expires too, but there was nothing left unreported.
    let empty = lease(&ledger, "broke-subject", lease_request("E", 1, "1.00", 300)).await;
    assert_eq!(held_granted_closed(&empty), ("0.00", "0.00", false), "{empty}");
    let expired_before = ledger.counter("leases_expired_unreported").await;
    assert_eq!(expired_before, 0);

    ledger.wait_past(&support::format_time(expires_at(&held).max(expires_at(&empty)))).await;
    // No job has run: the store still has the lease open, yet it no longer counts.
    assert_eq!(ledger.lease_row("I").await, Some((c.clone(), "4.00".into(), false)));
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "10.00"));

    assert_eq!(ledger::expiry::pass(&ledger.state).await.expect("pass"), 0, "closing leases books no entries");
    assert_eq!(ledger.lease_row("I").await, Some((c.clone(), "0".into(), true)));
    assert_eq!(ledger.lease_row("E").await.map(|r| r.2), Some(true));
    assert_eq!(ledger.counter("leases_expired_unreported").await, 1);
    assert_eq!(ledger::expiry::pass(&ledger.state).await.expect("pass"), 0);
    assert_eq!(ledger.counter("leases_expired_unreported").await, 1, "a second pass closes nothing");
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "10.00"));
    assert_eq!(ledger.all_transactions(&c).await.len(), 1, "only the funding");
    let _ = broke;
    ledger.assert_journal_sound().await;
}

async fn deleted_customers_do_not_starve_the_expiry_pass(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    // More deleted customers with an expired lease and a grant fallen due than one pass takes on
    // (200 of each kind).
    let mut tasks = Vec::new();
    for worker in 0..6 {
        let (http, base) = (ledger.http.clone(), ledger.base.clone());
        tasks.push(tokio::spawn(async move {
            for i in (worker..201).step_by(6) {
                let key = format!("gone-{i}");
                let created: Value = http
                    .post(format!("{base}/v3/openmeter/customers"))
                    .bearer_auth(support::TOKEN)
                    .json(&json!({"name": key, "key": key, "usage_attribution": {"subject_keys": [key]}}))
                    .send()
                    .await
                    .expect("create")
                    .json()
                    .await
                    .expect("json");
                let id = created["id"].as_str().expect("id").to_owned();
                let grant = grant_body("1.00", json!({"expires_after": "PT1S"}));
                let resp = http
                    .post(format!("{base}/v3/openmeter/customers/{id}/credits/grants"))
                    .bearer_auth(support::TOKEN)
                    .json(&grant)
                    .send()
                    .await;
                assert_eq!(resp.expect("grant").status().as_u16(), 201);
                let sync = json!({"node": "n", "subjects": [subject_sync(&key, json!({"lease": lease_request(&key, 1, "1.00", 300)}))]});
                let resp =
                    http.post(format!("{base}/v3/gateway/sync")).bearer_auth(support::TOKEN).json(&sync).send().await;
                assert_eq!(resp.expect("sync").status().as_u16(), 200);
                let resp = http.delete(format!("{base}/v3/openmeter/customers/{id}")).bearer_auth(support::TOKEN).send().await;
                assert_eq!(resp.expect("delete").status().as_u16(), 204);
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    // One live customer with an expired lease, another with a grant fallen due.
    let c = ledger.customer("alive").await;
    ledger.grant(&c, grant_body("10.00", json!({}))).await;
    let held = lease(&ledger, "alive-subject", lease_request("alive", 1, "4.00", 300)).await;
    assert_eq!(held_granted_closed(&held), ("4.00", "4.00", false));
    let d = ledger.customer("waiting").await;
    // Effective in a second, when the deleted customers' grants have all expired too.
    let effective_at = support::format_time(ledger.db_now().await + chrono::TimeDelta::seconds(1));
    let pending = ledger.grant(&d, grant_body("2.00", json!({"effective_at": effective_at}))).await;
    assert_eq!(pending["status"], "pending", "{pending}");
    ledger.wait_past(&support::format_time(expires_at(&held))).await;
    ledger.wait_past(&effective_at).await;
    assert_eq!(ledger::expiry::pass(&ledger.state).await.expect("pass"), 1, "the live customer's funding");
    let funded = sqlx::query("SELECT COUNT(*) FROM movements WHERE grant_id = $1 AND kind = 'funded'")
        .bind(id_of(&pending))
        .fetch_one(ledger.state.db.pool())
        .await
        .expect("count");
    assert_eq!(sqlx::Row::try_get::<i64, _>(&funded, 0).expect("count"), 1, "booked in the store");
    assert_eq!(ledger.lease_row("alive").await, Some((c.clone(), "0".into(), true)), "the lease was closed");
    assert_eq!(ledger.counter("leases_expired_unreported").await, 1);
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "10.00"));
    assert_eq!(ledger.balance(&d, "").await, balance("2.00", "2.00"));
    ledger.assert_journal_sound().await;
}

async fn two_instances_close_an_expired_lease_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (a, b) = (Ledger::start(&db).await, Ledger::start(&db).await);
    let c = a.customer("shared").await;
    a.grant(&c, grant_body("10.00", json!({}))).await;
    let held = lease(&a, "shared-subject", lease_request("X", 1, "4.00", 300)).await;
    assert_eq!(held_granted_closed(&held), ("4.00", "4.00", false));
    a.wait_past(&support::format_time(expires_at(&held))).await;
    let passes: Vec<_> = (0..3)
        .flat_map(|_| [a.state.clone(), b.state.clone()])
        .map(|s| tokio::spawn(async move { ledger::expiry::pass(&s).await.expect("pass") }))
        .collect();
    for p in passes {
        assert_eq!(p.await.expect("join"), 0);
    }
    let counted = a.counter("leases_expired_unreported").await + b.counter("leases_expired_unreported").await;
    assert_eq!(counted, 1, "closed exactly once over both instances");
    assert_eq!(a.lease_row("X").await, Some((c.clone(), "0".into(), true)));
    assert_eq!(b.balance(&c, "").await, balance("10.00", "10.00"));
    a.assert_journal_sound().await;
}

/// A lease is capped at the expiry of the grant behind it, and a renewal moves it onto credit
/// that lasts (issue: credit was spent after it expired).
async fn a_lease_never_outlives_the_credit_behind_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("expiring").await;
    let subject = "expiring-subject";
    let promo = ledger.grant(&c, grant_body("1.00", json!({"priority": 1, "expires_after": "PT30S"}))).await;
    let promo_expiry = parse_time(promo["expires_at"].as_str().expect("expires_at"));
    let opened = lease(&ledger, subject, lease_request("L", 1, "0.50", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&opened), ("0.50", "0.50", false));
    assert_eq!(expires_at(&opened), promo_expiry, "the lease ends with the promotional grant: {opened}");

    // Credit that outlives the lease arrives: the next renewal moves the lease onto it, while
    // the promotional grant is still drawn first by usage.
    ledger.grant(&c, grant_body("5.00", json!({"priority": 10}))).await;
    let (status, body) = ledger
        .sync(json!({"node": "n", "subjects": [subject_sync(subject, json!({"lease": lease_request("L", 1, "0", MINUTE_MS)}))]}))
        .await;
    assert_eq!(status, 200, "{body}");
    let renewed = &body["subjects"][0];
    let server_time = parse_time(body["server_time"].as_str().expect("server_time"));
    assert_eq!(held_granted_closed(renewed), ("0.50", "0", false));
    assert!(expires_at(renewed) > promo_expiry && expires_at(renewed) > server_time, "{renewed}");
    let mut range = usage_range(0, 2, "0.20", "credit_only");
    range["lease_id"] = json!("L");
    let captured = ledger.sync_one("n", subject_sync(subject, json!({ "usage": range }))).await;
    assert_eq!(captured["usage"], "booked");
    let drawn = summary(&ledger.all_transactions(&c).await[..1]);
    assert_eq!(drawn[0].2, id_of(&promo), "usage draws the grant that expires first: {drawn:?}");
}

/// A void takes what leases held of the voided grant: the next answer says so.
async fn a_void_shrinks_the_leases_it_backed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("voided").await;
    let subject = "voided-subject";
    let a = ledger.grant(&c, grant_body("3.00", json!({"priority": 1}))).await;
    ledger.grant(&c, grant_body("1.00", json!({"priority": 2}))).await;
    let opened = lease(&ledger, subject, lease_request("L", 1, "4.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&opened), ("4.00", "4.00", false));
    let (status, body) =
        ledger.post(&format!("/v3/openmeter/customers/{c}/credits/grants/{}/void", id_of(&a)), json!({})).await;
    assert_eq!(status, 200, "{body}");
    let renewed = lease(&ledger, subject, lease_request("L", 1, "0", MINUTE_MS)).await;
    assert_eq!((held_granted_closed(&renewed), renewed["live"].as_str()), (("1.00", "0", false), Some("0.00")));
    assert_eq!(ledger.balance(&c, "").await, balance("1.00", "0.00"));
}

/// A hold stored before holds were backed (no `backing`) is backed when its book is loaded.
async fn a_lease_stored_without_backing_is_backed_on_load(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("legacy").await;
    let subject = "legacy-subject";
    ledger.grant(&c, grant_body("2.00", json!({}))).await;
    lease(&ledger, subject, lease_request("L", 1, "1.50", MINUTE_MS)).await;
    sqlx::query("UPDATE holds SET backing = NULL").execute(ledger.state.db.pool()).await.expect("update");
    assert_eq!(ledger.balance(&c, "").await, balance("2.00", "0.50"));
    let mut range = usage_range(0, 3, "1.50", "credit_only");
    range["lease_id"] = json!("L");
    let both = json!({"usage": range, "lease": lease_request("L", 1, "0", MINUTE_MS)});
    let captured = ledger.sync_one("n", subject_sync(subject, both)).await;
    assert_eq!((held_granted_closed(&captured), captured["live"].as_str()), (("0.00", "0", false), Some("0.50")));
}

/// Found on Kong's engine under load: every worker's tick renews the lease with the node's latest
/// request number while a call's top-up with that number is still on its way. The renewal
/// arrived first, took the number, and the top-up was then served as a retry: it granted nothing,
/// the node took the lease for dry, and calls of a customer with ample credit were refused.
async fn a_renewal_that_overtakes_a_top_up_does_not_swallow_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("overtaken").await;
    ledger.grant(&c, grant_body("10.00", json!({}))).await;
    let subject = "overtaken-subject";
    let opened = lease(&ledger, subject, lease_request("L", 1, "4.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&opened), ("4.00", "4.00", false));
    let renewed = lease(&ledger, subject, lease_request("L", 2, "0", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&renewed), ("4.00", "0", false), "a renewal adds nothing");
    let topped_up = lease(&ledger, subject, lease_request("L", 2, "3.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&topped_up), ("7.00", "3.00", false), "the top-up it overtook still adds");
    let retried = lease(&ledger, subject, lease_request("L", 2, "3.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&retried), ("7.00", "0", false), "and only once");
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "3.00"));
    ledger.assert_journal_sound().await;
}

/// A top-up the node sent before it released the lease, overtaken by the release: it neither
/// opens the lease again nor carves credit (the node knows the lease closed and asks anew, with a
/// higher number, when it needs one).
async fn a_top_up_overtaken_by_the_release_leaves_the_lease_closed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let c = ledger.customer("overtaken-release").await;
    ledger.grant(&c, grant_body("10.00", json!({}))).await;
    let subject = "overtaken-release-subject";
    let opened = lease(&ledger, subject, lease_request("L", 1, "4.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&opened), ("4.00", "4.00", false));
    let mut release = lease_request("L", 3, "0", MINUTE_MS);
    release["release"] = json!(true);
    assert_eq!(held_granted_closed(&lease(&ledger, subject, release).await), ("0", "0", true));
    for late in [lease_request("L", 2, "3.00", MINUTE_MS), lease_request("L", 3, "0", MINUTE_MS)] {
        let answer = lease(&ledger, subject, late).await;
        assert_eq!(held_granted_closed(&answer), ("0", "0", true), "{answer}");
        assert_eq!(ledger.lease_row("L").await.map(|r| r.2), Some(true), "the lease stays released");
    }
    assert_eq!(ledger.balance(&c, "").await, balance("10.00", "10.00"));
    let reopened = lease(&ledger, subject, lease_request("L", 4, "2.00", MINUTE_MS)).await;
    assert_eq!(held_granted_closed(&reopened), ("2.00", "2.00", false), "a newer request opens it");
    ledger.assert_journal_sound().await;
}

on_both_backends!(
    a_top_up_overtaken_by_the_release_leaves_the_lease_closed,
    a_renewal_that_overtakes_a_top_up_does_not_swallow_it,
    leases_open_top_up_renew_release_and_reopen,
    leases_never_hold_more_than_is_live,
    a_lease_granted_less_than_it_wants_recalls_the_others,
    concurrent_leases_and_charges_never_exceed_the_balance,
    a_lease_id_of_another_customer_gets_no_credit,
    usage_against_a_lease_is_captured_from_it,
    each_lease_captures_the_credit_it_set_aside,
    leases_in_a_feature_scope_carve_only_credit_the_feature_may_use,
    an_unrenewed_lease_expires_and_one_pass_closes_it,
    two_instances_close_an_expired_lease_once,
    deleted_customers_do_not_starve_the_expiry_pass,
    a_lease_never_outlives_the_credit_behind_it,
    a_void_shrinks_the_leases_it_backed,
    a_lease_stored_without_backing_is_backed_on_load,
);
