//! Notifications: channels and rules (validation, scopes), threshold events that fire once and
//! re-arm, expiring-grant events, Standard Webhooks delivery verified by a real receiver,
//! retries with backoff and the same `webhook-id`, a slow receiver that never slows a booking,
//! and two instances on one PostgreSQL delivering every attempt once.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ledger::notify::delivery::WebhookConfig;
use serde_json::{json, Value};
use support::receiver::{Answer, Receiver, SECRET};
use support::{
    customer_path, grant_body, lease_request, subject_sync, usage_range, Backend, Ledger, TestDb, GATEWAY_TOKEN,
};

const CHANNELS: &str = "/v3/openmeter/notification/channels";
const RULES: &str = "/v3/openmeter/notification/rules";
const EVENTS: &str = "/v3/openmeter/notification/events";

fn fast() -> WebhookConfig {
    WebhookConfig { retry_ms: 100, max_retry_ms: 1000, max_attempts: 4, timeout_ms: 1000 }
}

/// A ledger whose delivery job runs until the value is dropped.
struct Delivering {
    ledger: Ledger,
    job: tokio::task::JoinHandle<()>,
}

impl Drop for Delivering {
    fn drop(&mut self) {
        self.job.abort();
    }
}

async fn delivering(db: &TestDb, config: WebhookConfig) -> Delivering {
    let ledger = Ledger::start(db).await;
    let (db, metrics) = (ledger.state.db.clone(), ledger.state.metrics.clone());
    let job = tokio::spawn(ledger::notify::delivery::run(db, metrics, config));
    Delivering { ledger, job }
}

async fn channel(ledger: &Ledger, url: &str) -> String {
    let body = json!({"type": "webhook", "name": "ops", "url": url, "signing_secret": SECRET,
        "custom_headers": {"X-Team": "billing"}});
    let (status, body) = ledger.post(CHANNELS, body).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

async fn threshold_rule(ledger: &Ledger, channel: &str, thresholds: Value) -> String {
    let body = json!({"type": "credits.balance.threshold", "name": "low", "channels": [channel],
        "currency": "USD", "thresholds": thresholds});
    let (status, body) = ledger.post(RULES, body).await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().expect("id").to_owned()
}

async fn charge(ledger: &Ledger, customer: &str, amount: &str, key: &str) {
    let (status, body) = ledger.charge(customer, amount, key).await;
    assert_eq!(status, 201, "{body}");
}

/// Every event, newest first (one page).
async fn events(ledger: &Ledger, query: &str) -> Vec<Value> {
    let (status, body) = ledger.get(&format!("{EVENTS}{query}")).await;
    assert_eq!(status, 200, "{body}");
    body["data"].as_array().expect("data").clone()
}

/// Waits until every delivery of every event has left `pending`.
async fn settled_events(ledger: &Ledger, timeout: Duration) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let all = events(ledger, "?page[size]=100").await;
        let pending = all
            .iter()
            .flat_map(|e| e["deliveries"].as_array().cloned().unwrap_or_default())
            .any(|d| d["status"] == "pending");
        if !pending {
            return all;
        }
        assert!(started.elapsed() < timeout, "deliveries still pending after {timeout:?}: {all:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn channels_and_rules_are_validated_and_admin_only(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (status, made) =
        ledger.post(CHANNELS, json!({"type": "webhook", "name": "a", "url": "https://example.com/hook"})).await;
    assert_eq!(status, 201, "{made}");
    let secret = made["signing_secret"].as_str().expect("generated secret");
    assert!(secret.starts_with("whsec_") && ledger::notify::signature::key(secret).is_ok(), "{secret}");
    let id = made["id"].as_str().expect("id");
    for (body, field) in [
        (json!({"type": "webhook", "name": "a", "url": "ftp://example.com/x"}), "url"),
        (json!({"type": "webhook", "name": "a", "url": "https://user:pw@example.com/x"}), "url"),
        (json!({"type": "webhook", "name": "a", "url": "not a url"}), "url"),
        (
            json!({"type": "webhook", "name": "a", "url": "http://x/", "custom_headers": {"webhook-id": "x"}}),
            "custom_headers.webhook-id",
        ),
        (
            json!({"type": "webhook", "name": "a", "url": "http://x/", "custom_headers": {"bad header": "x"}}),
            "custom_headers.bad header",
        ),
        (json!({"type": "webhook", "name": "a", "url": "http://x/", "signing_secret": "plain"}), "signing_secret"),
        (json!({"type": "email", "name": "a", "url": "http://x/"}), "type"),
        (json!({"type": "webhook", "name": "", "url": "http://x/"}), "name"),
    ] {
        let reply = ledger.call(reqwest::Method::POST, CHANNELS).json(&body).send().await;
        reply.assert_problem(400, Some(field));
    }
    let unknown = support::UNKNOWN_ID;
    let rule = |extra: Value| {
        support::merged(
            json!({"type": "credits.balance.threshold", "name": "r", "channels": [id], "currency": "USD", "thresholds": [{"type": "absolute", "value": "5"}]}),
            extra,
        )
    };
    for (body, field) in [
        (rule(json!({"channels": [unknown]})), "channels[0]"),
        (rule(json!({"channels": []})), "channels"),
        (rule(json!({"currency": null})), "currency"),
        (rule(json!({"thresholds": [{"type": "percent", "value": "120"}]})), "thresholds[0].value"),
        (
            rule(json!({"thresholds": [{"type": "absolute", "value": "5"}, {"type": "absolute", "value": "5.00"}]})),
            "thresholds[1]",
        ),
        (rule(json!({"thresholds": [{"type": "absolute", "value": "five"}]})), "thresholds[0].value"),
        (rule(json!({"before": "P3D"})), "before"),
        (rule(json!({"type": "credits.grant.expiring", "thresholds": null})), "before"),
        (rule(json!({"customer_ids": ["nope"]})), "customer_ids[0]"),
    ] {
        let reply = ledger.call(reqwest::Method::POST, RULES).json(&body).send().await;
        reply.assert_problem(400, Some(field));
    }
    let (status, made_rule) = ledger.post(RULES, rule(json!({}))).await;
    assert_eq!(status, 201, "{made_rule}");
    let rule_id = made_rule["id"].as_str().expect("rule id");
    // A channel in use cannot go; the rule can, then the channel.
    let (status, body) = ledger.delete(&format!("{CHANNELS}/{id}")).await;
    assert_eq!((status, body["rules"].clone()), (409, json!([rule_id])), "{body}");
    let (status, _) = ledger.put(&format!("{RULES}/{rule_id}"), rule(json!({"name": "renamed"}))).await;
    assert_eq!(status, 200);
    assert_eq!(ledger.get(&format!("{RULES}/{rule_id}")).await.1["name"], "renamed");
    assert_eq!(ledger.delete(&format!("{RULES}/{rule_id}")).await.0, 204);
    assert_eq!(ledger.delete(&format!("{CHANNELS}/{id}")).await.0, 204);
    assert_eq!(ledger.get(&format!("{CHANNELS}/{id}")).await.0, 404);
    // Replacing a channel without a secret keeps its secret.
    let (_, other) =
        ledger.post(CHANNELS, json!({"type": "webhook", "name": "b", "url": "http://127.0.0.1:1/x"})).await;
    let other_id = other["id"].as_str().expect("id");
    let (status, replaced) = ledger
        .put(&format!("{CHANNELS}/{other_id}"), json!({"type": "webhook", "name": "c", "url": "http://127.0.0.1:2/y"}))
        .await;
    assert_eq!((status, &replaced["signing_secret"]), (200, &other["signing_secret"]), "{replaced}");
    let (_, page) = ledger.get(&format!("{CHANNELS}?page[size]=1")).await;
    assert_eq!(page["meta"]["page"]["total"], json!(1), "{page}");
    // Only an admin token may see or change any of it.
    for path in [CHANNELS, RULES, EVENTS] {
        let reply = ledger.call_as(GATEWAY_TOKEN, reqwest::Method::GET, path).send().await;
        reply.assert_problem(403, None);
        let reply = ledger.call_without_token(reqwest::Method::GET, path).send().await;
        assert_eq!(reply.status, 401);
    }
}

async fn a_threshold_fires_once_when_crossed_and_rearms_above(backend: Backend) {
    let db = TestDb::new(backend).await;
    let d = delivering(&db, fast()).await;
    let ledger = &d.ledger;
    let receiver = Receiver::start().await;
    let ch = channel(ledger, &receiver.url).await;
    let rule =
        threshold_rule(ledger, &ch, json!([{"type": "absolute", "value": "5.00"}, {"type": "percent", "value": "20"}]))
            .await;
    let c = ledger.customer("thrifty").await;
    ledger.grant(&c, grant_body("10", json!({}))).await;
    charge(ledger, &c, "4", "a").await; // 6 left: above both (20 % of 10 = 2)
    charge(ledger, &c, "1.5", "b").await; // 4.5: below 5.00
    charge(ledger, &c, "0.5", "c").await; // 4: still below, no second event
    ledger.adjust(&c, json!({"name": "top up", "currency": "USD", "amount": "10"})).await; // 14: re-armed
    charge(ledger, &c, "10.5", "d").await; // 3.5: below 5.00 again, and below 20 % of 20 = 4
    let all = settled_events(ledger, Duration::from_secs(20)).await;
    let fired: Vec<(String, String)> = all
        .iter()
        .rev()
        .map(|e| {
            (
                e["payload"]["data"]["threshold"]["value"].as_str().unwrap_or("?").to_owned(),
                e["payload"]["data"]["balance"]["live"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    assert_eq!(fired, [("5.00".into(), "4.5".into()), ("5.00".into(), "3.5".into()), ("20".into(), "3.5".into())]);
    let percent = &all[0]["payload"];
    assert_eq!(percent["type"], "credits.balance.threshold");
    assert_eq!(percent["data"]["threshold"], json!({"type": "percent", "value": "20", "amount": "4"}));
    assert_eq!(percent["data"]["customer"], json!({"id": c, "key": "thrifty"}));
    assert_eq!(percent["data"]["rule"]["id"], json!(rule));
    for e in &all {
        assert_eq!(
            e["deliveries"],
            json!([{"channel_id": ch, "status": "success", "attempts": 1, "last_status": 200, "last_attempt_at": e["deliveries"][0]["last_attempt_at"]}]),
            "{e}"
        );
    }
    let received = receiver.wait_for(3, Duration::from_secs(5)).await;
    for r in &received {
        assert!(r.signature_valid, "{r:?}");
        assert_eq!(r.headers["x-team"], "billing");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.body["id"], json!(r.id), "webhook-id is the event id");
        assert!((r.timestamp - chrono::Utc::now().timestamp()).abs() < 60);
        assert!(all.iter().any(|e| e["payload"] == r.body), "{:?} delivered as listed", r.body);
    }
    let (_, one) = ledger.get(&format!("{EVENTS}/{}", all[0]["id"].as_str().expect("id"))).await;
    assert_eq!(one["id"], all[0]["id"]);
    assert_eq!(events(ledger, &format!("?filter[customer_id]={c}&page[size]=2")).await.len(), 2);
    assert_eq!(ledger.counter("notification_events").await, 3);
    ledger.assert_journal_sound().await;
}

async fn failed_deliveries_are_retried_with_backoff_and_the_same_webhook_id(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config = WebhookConfig { retry_ms: 200, max_retry_ms: 10_000, max_attempts: 3, timeout_ms: 1000 };
    let d = delivering(&db, config).await;
    let ledger = &d.ledger;
    let receiver = Receiver::start().await;
    receiver.script(&[Answer::Status(500), Answer::Status(502)]);
    let ch = channel(ledger, &receiver.url).await;
    threshold_rule(ledger, &ch, json!([{"type": "absolute", "value": "1"}])).await;
    let c = ledger.customer("retry").await;
    ledger.grant(&c, grant_body("2", json!({}))).await;
    charge(ledger, &c, "1.5", "a").await;
    let got = receiver.wait_for(3, Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|r| r.answered).collect::<Vec<_>>(), [500, 502, 200]);
    assert!(got.iter().all(|r| r.id == got[0].id && r.signature_valid), "{got:?}");
    let gaps: Vec<Duration> = got.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(
        gaps[0] >= Duration::from_millis(190) && gaps[1] >= Duration::from_millis(390),
        "backoff 200 ms, then 400 ms: {gaps:?}"
    );
    let all = settled_events(ledger, Duration::from_secs(5)).await;
    let delivery = &all[0]["deliveries"][0];
    assert_eq!(
        (&delivery["status"], &delivery["attempts"], &delivery["last_status"]),
        (&json!("success"), &json!(3), &json!(200))
    );
    assert_eq!(ledger.counter("webhook_attempts_failed").await, 2);

    // A receiver that never accepts: failed after the last attempt, with its last answer.
    receiver.script(&[Answer::Status(500); 3]);
    charge(ledger, &c, "0.25", "b").await; // 0.25 left: still below 1, nothing new
    ledger.adjust(&c, json!({"name": "top up", "currency": "USD", "amount": "5"})).await;
    charge(ledger, &c, "4.5", "c").await;
    let all = settled_events(ledger, Duration::from_secs(10)).await;
    let delivery = &all[0]["deliveries"][0];
    assert_eq!(
        (&delivery["status"], &delivery["attempts"], &delivery["last_status"]),
        (&json!("failed"), &json!(3), &json!(500)),
        "{delivery}"
    );
    assert!(delivery["last_error"].as_str().is_some_and(|e| e.contains("500")), "{delivery}");
    assert_eq!(ledger.counter("webhook_deliveries_failed").await, 1);
}

/// A redirect is a failed attempt, retried later at the channel's URL: never followed.
async fn redirects_are_not_followed(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config = WebhookConfig { retry_ms: 300, max_retry_ms: 1000, max_attempts: 3, timeout_ms: 1000 };
    let d = delivering(&db, config).await;
    let ledger = &d.ledger;
    let receiver = Receiver::start().await;
    receiver.script(&[Answer::Status(307)]);
    let ch = channel(ledger, &receiver.url).await;
    threshold_rule(ledger, &ch, json!([{"type": "absolute", "value": "1"}])).await;
    let c = ledger.customer("moved").await;
    ledger.grant(&c, grant_body("2", json!({}))).await;
    charge(ledger, &c, "1.5", "a").await;
    let got = receiver.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(got.iter().map(|r| r.answered).collect::<Vec<_>>(), [307, 200]);
    assert!(got[1].at - got[0].at >= Duration::from_millis(290), "retried after the backoff, not followed: {got:?}");
    let all = settled_events(ledger, Duration::from_secs(5)).await;
    let delivery = &all[0]["deliveries"][0];
    assert_eq!((&delivery["status"], &delivery["attempts"]), (&json!("success"), &json!(2)), "{delivery}");
    assert_eq!(ledger.counter("webhook_attempts_failed").await, 1);
}

async fn a_slow_receiver_never_slows_a_booking(backend: Backend) {
    let db = TestDb::new(backend).await;
    let config = WebhookConfig { retry_ms: 100, max_retry_ms: 1000, max_attempts: 3, timeout_ms: 500 };
    let d = delivering(&db, config).await;
    let ledger = &d.ledger;
    let receiver = Receiver::start().await;
    receiver.script(&[Answer::Slow(Duration::from_secs(3))]);
    let ch = channel(ledger, &receiver.url).await;
    threshold_rule(ledger, &ch, json!([{"type": "absolute", "value": "50"}])).await;
    let c = ledger.customer("slow").await;
    ledger.grant(&c, grant_body("100", json!({}))).await;
    charge(ledger, &c, "60", "fire").await; // 40: fires; the first attempt hangs
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    for i in 0..10 {
        charge(ledger, &c, "1", &format!("during-{i}")).await;
    }
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "bookings took {:?} while a delivery hung",
        started.elapsed()
    );
    // The hung attempt timed out and the retry got through.
    let all = settled_events(ledger, Duration::from_secs(10)).await;
    let delivery = &all[0]["deliveries"][0];
    assert_eq!((&delivery["status"], &delivery["attempts"]), (&json!("success"), &json!(2)), "{delivery}");
}

async fn an_expiring_grant_is_announced_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let d = delivering(&db, fast()).await;
    let ledger = &d.ledger;
    let receiver = Receiver::start().await;
    let ch = channel(ledger, &receiver.url).await;
    let c = ledger.customer("expiring").await;
    let soon = ledger.grant(&c, grant_body("10", json!({"expires_after": "PT1H"}))).await;
    ledger.grant(&c, grant_body("10", json!({"expires_after": "P30D"}))).await; // not yet
    ledger.grant(&c, grant_body("10", json!({"expires_after": "PT2H", "filters": {"features": ["other"]}}))).await; // other scope
    charge(ledger, &c, "4", "a").await;
    // The rule comes last: a scan between the grant and the charge would rightly announce the
    // grant with all 10 left. Grants that expire soon already are announced all the same.
    let body = json!({"type": "credits.grant.expiring", "name": "soon", "channels": [ch], "before": "P1D", "feature_key": "tokens"});
    let (status, body) = ledger.post(RULES, body).await;
    assert_eq!(status, 201, "{body}");
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // more scans: still one event
    assert_eq!(receiver.deliveries().len(), 1, "{got:?}");
    let data = &got[0].body["data"];
    assert_eq!(got[0].body["type"], "credits.grant.expiring");
    assert_eq!(data["grant"]["id"], soon["id"]);
    assert_eq!(data["grant"]["remaining"], "6", "{data}");
    assert_eq!(data["grant"]["expires_at"], soon["expires_at"]);
    assert_eq!(data["feature_key"], "tokens");
    assert!(got[0].signature_valid);
}

/// An instance that claimed a delivery and died: its claim runs out, then another instance
/// makes the attempt (counted as the second), and the receiver gets it once.
async fn a_dead_instances_claim_runs_out_and_another_delivers(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await; // no delivery job yet
    let receiver = Receiver::start().await;
    let ch = channel(&ledger, &receiver.url).await;
    threshold_rule(&ledger, &ch, json!([{"type": "absolute", "value": "5"}])).await;
    let c = ledger.customer("orphaned").await;
    ledger.grant(&c, grant_body("10", json!({}))).await;
    charge(&ledger, &c, "6", "fire").await;
    // The dead instance's claim, for one second.
    let now = ledger.db_now().await;
    let until = now + chrono::TimeDelta::seconds(1);
    let mut conn = ledger.state.db.pool().acquire().await.expect("connection");
    let backend = ledger.state.db.backend();
    let claimed = ledger::store::outbox::claim(&mut conn, backend, now, until, "dead", 4, 10).await.expect("claim");
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    drop(conn);

    let d = delivering(&db, fast()).await;
    let got = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert!(ledger.db_now().await >= until, "delivered only once the claim ran out");
    let all = settled_events(&d.ledger, Duration::from_secs(5)).await;
    let delivery = &all[0]["deliveries"][0];
    assert_eq!((&delivery["status"], &delivery["attempts"]), (&json!("success"), &json!(2)), "{delivery}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(receiver.deliveries().len(), 1, "delivered once: {got:?}");
}

async fn two_instances_on_one_postgres_deliver_every_attempt_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let config = WebhookConfig { retry_ms: 100, max_retry_ms: 1000, max_attempts: 4, timeout_ms: 1000 };
    let (a, b) = (delivering(&db, config.clone()).await, delivering(&db, config).await);
    let receiver = Receiver::start().await;
    receiver.fail_first_of_each();
    let ch = channel(&a.ledger, &receiver.url).await;
    threshold_rule(&a.ledger, &ch, json!([{"type": "absolute", "value": "5"}])).await;
    const CUSTOMERS: usize = 12;
    for i in 0..CUSTOMERS {
        let ledger = if i % 2 == 0 { &a.ledger } else { &b.ledger };
        let c = ledger.customer(&format!("pair-{i}")).await;
        ledger.grant(&c, grant_body("10", json!({}))).await;
        charge(ledger, &c, "6", "spend").await;
    }
    // Each event: one refused attempt, one accepted — never an attempt twice.
    let got = receiver.wait_for(2 * CUSTOMERS, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let got = receiver.deliveries().into_iter().chain(got.into_iter().take(0)).collect::<Vec<_>>();
    let mut per_id: HashMap<String, Vec<u16>> = HashMap::new();
    for r in &got {
        assert!(r.signature_valid);
        per_id.entry(r.id.clone()).or_default().push(r.answered);
    }
    assert_eq!(per_id.len(), CUSTOMERS, "{per_id:?}");
    assert!(per_id.values().all(|answers| answers == &[503, 200]), "{per_id:?}");
    let all = settled_events(&b.ledger, Duration::from_secs(5)).await;
    assert!(all.iter().all(|e| e["deliveries"][0]["attempts"] == 2 && e["deliveries"][0]["status"] == "success"));
    let attempts =
        a.ledger.counter("webhook_attempts_succeeded").await + b.ledger.counter("webhook_attempts_succeeded").await;
    assert_eq!(attempts, CUSTOMERS as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_instances_deliver_every_attempt_once() {
    two_instances_on_one_postgres_deliver_every_attempt_once().await;
}

/// How many events a customer has.
async fn events_of(ledger: &Ledger, customer: &str) -> usize {
    events(ledger, &format!("?filter[customer_id]={customer}&page[size]=100")).await.len()
}

/// Every kind of booking is evaluated against a rule (one threshold at 5, one customer per
/// kind): gateway usage, a gateway lease, a void and an expiry that take the balance below it, a
/// grant that takes it back above (so the next crossing fires again); and changing the rule
/// re-arms what had fired.
async fn every_kind_of_booking_is_evaluated_and_a_changed_rule_rearms(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await; // no delivery job: events wait in the outbox
    let ch = channel(&ledger, "http://127.0.0.1:9/hook").await;
    let rule_body = |name: &str| {
        json!({"type": "credits.balance.threshold", "name": name, "channels": [ch], "currency": "USD",
            "thresholds": [{"type": "absolute", "value": "5"}]})
    };
    let (status, body) = ledger.post(RULES, rule_body("low")).await;
    assert_eq!(status, 201, "{body}");
    let rule = body["id"].as_str().expect("id").to_owned();

    let usage = ledger.customer("usage").await;
    ledger.grant(&usage, grant_body("10", json!({}))).await;
    let range = usage_range(0, 6, "6", "credit_only");
    let answer = ledger.sync_one("node", subject_sync("usage-subject", json!({ "usage": range }))).await;
    assert_eq!(answer["usage"], "booked", "{answer}");
    assert_eq!(events_of(&ledger, &usage).await, 1, "gateway usage down to 4");

    let leased = ledger.customer("leased").await;
    ledger.grant(&leased, grant_body("10", json!({}))).await;
    let lease = lease_request("L", 1, "6", 60_000);
    let answer = ledger.sync_one("node", subject_sync("leased-subject", json!({ "lease": lease }))).await;
    assert_eq!(answer["lease"]["granted"], "6", "{answer}");
    assert_eq!(events_of(&ledger, &leased).await, 1, "a lease of 6 leaves 4 live");

    let voided = ledger.customer("voided").await;
    let big = ledger.grant(&voided, grant_body("10", json!({}))).await;
    ledger.grant(&voided, grant_body("3", json!({}))).await;
    assert_eq!(events_of(&ledger, &voided).await, 0, "13 is above 5");
    let void = format!("{}/credits/grants/{}/void", customer_path(&voided), big["id"].as_str().expect("id"));
    let (status, body) = ledger.post(&void, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(events_of(&ledger, &voided).await, 1, "a void down to 3");

    let expired = ledger.customer("expired").await;
    let expiring = ledger.grant(&expired, grant_body("10", json!({"expires_after": "PT1S"}))).await;
    ledger.grant(&expired, grant_body("3", json!({}))).await;
    ledger.wait_past(expiring["expires_at"].as_str().expect("expires_at")).await;
    assert!(ledger::expiry::pass(&ledger.state).await.expect("expiry pass") > 0, "the expiry was booked");
    assert_eq!(events_of(&ledger, &expired).await, 1, "an expiry down to 3");

    let regranted = ledger.customer("regranted").await;
    ledger.grant(&regranted, grant_body("10", json!({}))).await;
    charge(&ledger, &regranted, "6", "a").await; // 4: fires
    ledger.grant(&regranted, grant_body("10", json!({}))).await; // 14: re-armed
    charge(&ledger, &regranted, "10", "b").await; // 4: fires again
    assert_eq!(events_of(&ledger, &regranted).await, 2, "a grant re-arms the threshold");

    let changed = ledger.customer("changed").await;
    ledger.grant(&changed, grant_body("10", json!({}))).await;
    // A refused booking writes no event: the outbox row is in the booking's transaction.
    let (status, body) = ledger.charge(&changed, "11", "refused").await;
    assert_eq!(status, 402, "{body}");
    assert_eq!(events_of(&ledger, &changed).await, 0, "nothing booked, nothing announced");
    charge(&ledger, &changed, "6", "a").await; // 4: fires
    charge(&ledger, &changed, "6", "a").await; // the same charge again: answered, not booked
    charge(&ledger, &changed, "0.5", "b").await; // 3.5: still below, fired already
    assert_eq!(events_of(&ledger, &changed).await, 1);
    let (status, body) = ledger.put(&format!("{RULES}/{rule}"), rule_body("low balance")).await;
    assert_eq!(status, 200, "{body}");
    charge(&ledger, &changed, "0.5", "c").await; // 3: below a re-armed threshold
    assert_eq!(events_of(&ledger, &changed).await, 2, "changing the rule re-armed it");
    ledger.assert_journal_sound().await;
}

async fn charges_are_unaffected_by_customers_outside_a_rule(backend: Backend) {
    let db = TestDb::new(backend).await;
    let d = delivering(&db, fast()).await;
    let ledger = &d.ledger;
    let receiver = Receiver::start().await;
    let ch = channel(ledger, &receiver.url).await;
    let watched = ledger.customer("watched").await;
    let ignored = ledger.customer("ignored").await;
    let body = json!({"type": "credits.balance.threshold", "name": "one", "channels": [ch], "currency": "USD",
        "customer_ids": [watched], "feature_key": "tokens", "thresholds": [{"type": "absolute", "value": "1"}]});
    assert_eq!(ledger.post(RULES, body).await.0, 201);
    for c in [&watched, &ignored] {
        ledger.grant(c, grant_body("2", json!({"filters": {"features": ["tokens"]}}))).await;
        ledger.grant(c, grant_body("5", json!({"filters": {"features": ["other"]}}))).await;
        let (status, body) = ledger.charge_with(c, json!({"amount": "1.5", "currency": "USD", "settlement_mode": "credit_only", "key": "t", "feature_key": "tokens"})).await;
        assert_eq!(status, 201, "{body}");
    }
    let all = settled_events(ledger, Duration::from_secs(10)).await;
    assert_eq!(all.len(), 1, "{all:#?}");
    assert_eq!(all[0]["customer_id"], json!(watched));
    assert_eq!(all[0]["payload"]["data"]["feature_key"], "tokens");
    assert_eq!(all[0]["payload"]["data"]["balance"]["live"], "0.5");
    let _ = customer_path(&ignored);
}

/// A scan takes the 500 soonest expiring grants it has not noted for a rule: those of customers
/// the rule does not watch are noted too, so that they cannot hide, scan after scan, a grant it
/// does watch that expires a little later.
async fn expiring_grants_a_rule_does_not_watch_never_hide_one_it_does(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (status, ch) =
        ledger.post(CHANNELS, json!({"type": "webhook", "name": "ops", "url": "http://127.0.0.1:9/hook"})).await;
    assert_eq!(status, 201, "{ch}");
    let watched = ledger.customer("watched").await;
    let busy = ledger.customer("busy").await;
    let rule = json!({"type": "credits.grant.expiring", "name": "soon", "channels": [ch["id"]], "before": "P1D",
        "customer_ids": [watched]});
    let (status, body) = ledger.post(RULES, rule).await;
    assert_eq!(status, 201, "{body}");
    for _ in 0..500 {
        ledger.grant(&busy, grant_body("1", json!({"expires_after": "PT1H"}))).await;
    }
    ledger.grant(&watched, grant_body("10", json!({"expires_after": "PT2H"}))).await;
    for _ in 0..3 {
        let now = ledger.db_now().await;
        ledger::notify::expiring::scan(&ledger.state.db, now).await.expect("scan");
    }
    let (status, body) = ledger.get(&format!("{EVENTS}?filter[customer_id]={watched}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "the watched grant expires within P1D: {body}");
}

/// A delivery retried under `--webhook-max-attempts 10` whose ledger restarts with
/// `--webhook-max-attempts 2` (or meets an instance configured so) after two attempts is failed
/// (and counted), not left `pending` and due forever.
async fn a_delivery_without_attempts_left_is_failed_after_the_limit_was_lowered(backend: Backend) {
    use ledger::notify::delivery;
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (status, ch) =
        ledger.post(CHANNELS, json!({"type": "webhook", "name": "ops", "url": "http://127.0.0.1:9/hook"})).await;
    assert_eq!(status, 201, "{ch}");
    let rule = json!({"type": "credits.balance.threshold", "name": "low", "channels": [ch["id"]], "currency": "USD",
        "thresholds": [{"type": "absolute", "value": "5"}]});
    assert_eq!(ledger.post(RULES, rule).await.0, 201);
    let c = ledger.customer("c").await;
    ledger.grant(&c, grant_body("10", json!({}))).await;
    let (status, body) = ledger.charge(&c, "6", "k").await;
    assert_eq!(status, 201, "{body}");
    let (db_, metrics) = (&ledger.state.db, &ledger.state.metrics);
    let before = WebhookConfig { retry_ms: 1, max_retry_ms: 1, max_attempts: 10, timeout_ms: 1000 };
    let client = delivery::client(&before).expect("client");
    for _ in 0..2 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(delivery::pass(db_, metrics, &client, &before).await.expect("pass"), 1);
    }
    let after = WebhookConfig { max_attempts: 2, ..before };
    for _ in 0..3 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        delivery::pass(db_, metrics, &client, &after).await.expect("pass");
    }
    let (_, body) = ledger.get(EVENTS).await;
    let d = &body["data"][0]["deliveries"][0];
    assert_eq!(d["attempts"], 2, "{d}");
    assert_ne!(d["status"], "pending", "a delivery with no attempts left must be failed, not pending forever: {d}");
}

/// How many notification events the scans of `credits.grant.expiring` rules write, and for
/// which grants, over three scans.
async fn expiring_events(ledger: &Ledger, customer: &str) -> Vec<Value> {
    for _ in 0..3 {
        let now = ledger.db_now().await;
        ledger::notify::expiring::scan(&ledger.state.db, now).await.expect("scan");
    }
    events(ledger, &format!("?filter[customer_id]={customer}&page[size]=100")).await
}

/// `credits.grant.expiring` "fires once per grant when it will expire within `before` and still
/// has unused credit": a grant spent in full, and a voided one, have nothing left to lose and are
/// never announced; the one with credit left is, once, with what it has left.
async fn a_grant_with_nothing_left_is_never_announced_as_expiring(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await; // no delivery job: events wait in the outbox
    let ch = channel(&ledger, "http://127.0.0.1:9/hook").await;
    let body = json!({"type": "credits.grant.expiring", "name": "soon", "channels": [ch], "before": "P1D"});
    let (status, body) = ledger.post(RULES, body).await;
    assert_eq!(status, 201, "{body}");
    let c = ledger.customer("spent").await;
    ledger.grant(&c, grant_body("4", json!({"expires_after": "PT1H", "priority": 1}))).await;
    let voided = ledger.grant(&c, grant_body("6", json!({"expires_after": "PT2H", "priority": 2}))).await;
    let kept = ledger.grant(&c, grant_body("10", json!({"expires_after": "PT3H", "priority": 3}))).await;
    charge(&ledger, &c, "4", "all-of-the-first").await;
    let void = format!("{}/credits/grants/{}/void", customer_path(&c), voided["id"].as_str().expect("id"));
    let (status, body) = ledger.post(&void, json!({})).await;
    assert_eq!(status, 200, "{body}");

    let all = expiring_events(&ledger, &c).await;
    let announced: Vec<(&Value, &Value)> = all
        .iter()
        .map(|e| (&e["payload"]["data"]["grant"]["id"], &e["payload"]["data"]["grant"]["remaining"]))
        .collect();
    assert_eq!(announced, [(&kept["id"], &json!("10"))], "{all:#?}");
}

/// A threshold rule in a currency watches only customers that have something in it: "A customer
/// that never had that currency is not 'low'" — not one with only euros, nor one whose dollar
/// charges all went to its invoice; the first dollar credit makes it one the rule watches.
async fn a_customer_that_never_had_the_currency_is_not_low(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await; // no delivery job: events wait in the outbox
    let ch = channel(&ledger, "http://127.0.0.1:9/hook").await;
    threshold_rule(&ledger, &ch, json!([{"type": "absolute", "value": "5"}, {"type": "percent", "value": "50"}])).await;

    let euros = ledger.customer("euros").await;
    ledger.grant(&euros, grant_body("10", json!({"currency": "EUR"}))).await;
    let (status, body) = ledger
        .charge_with(&euros, json!({"amount": "9", "currency": "EUR", "settlement_mode": "credit_only", "key": "eur"}))
        .await;
    assert_eq!(status, 201, "{body}");
    let invoiced = ledger.customer("invoiced").await;
    let (status, body) = ledger
        .charge_with(
            &invoiced,
            json!({"amount": "3", "currency": "USD", "settlement_mode": "credit_then_invoice", "key": "usd"}),
        )
        .await;
    assert_eq!((status, body["overage"].as_str()), (201, Some("3")), "{body}");
    assert_eq!(events_of(&ledger, &euros).await, 0, "1 EUR left says nothing about USD");
    assert_eq!(events_of(&ledger, &invoiced).await, 0, "no USD credit was ever had");

    // Dollar credit, spent down below both thresholds: now it is low.
    ledger.grant(&euros, grant_body("10", json!({}))).await;
    charge(&ledger, &euros, "6", "usd").await;
    assert_eq!(events_of(&ledger, &euros).await, 2, "4 USD is at or below 5 and 50 % of 10");
    ledger.assert_journal_sound().await;
}

/// Two instances on one PostgreSQL scanning for expiring grants at the same time announce each
/// grant once ("fires once per grant", whichever instance scans).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_two_instances_announce_an_expiring_grant_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (Ledger::start(&db).await, Ledger::start(&db).await);
    let ch = channel(&a, "http://127.0.0.1:9/hook").await;
    let body = json!({"type": "credits.grant.expiring", "name": "soon", "channels": [ch], "before": "P1D"});
    let (status, body) = a.post(RULES, body).await;
    assert_eq!(status, 201, "{body}");
    let mut customers = Vec::new();
    for i in 0..10 {
        let c = a.customer(&format!("expiring-{i}")).await;
        a.grant(&c, grant_body("10", json!({"expires_after": "PT1H"}))).await;
        customers.push(c);
    }
    let scans = (0..4).flat_map(|_| [a.state.db.clone(), b.state.db.clone()]).map(|db| {
        tokio::spawn(async move {
            let mut conn = db.pool().acquire().await.expect("connection");
            let now = db.now(&mut conn).await.expect("now");
            drop(conn);
            ledger::notify::expiring::scan(&db, now).await.expect("scan")
        })
    });
    let mut written = 0;
    for scan in scans.collect::<Vec<_>>() {
        written += scan.await.expect("scan task");
    }
    assert_eq!(written, customers.len(), "one event per grant, whichever instance wrote it");
    for c in &customers {
        assert_eq!(events_of(&a, c).await, 1, "{c}");
    }
}

/// `GET …/notification/events` "lists events newest first (`page[size]`, `page[after]`,
/// `page[before]`, `filter[type]`, `filter[rule_id]`, `filter[customer_id]`)".
async fn notification_events_are_listed_newest_first_by_filter_and_cursor(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await; // no delivery job: events wait in the outbox
    let ch = channel(&ledger, "http://127.0.0.1:9/hook").await;
    let low = threshold_rule(&ledger, &ch, json!([{"type": "absolute", "value": "5"}])).await;
    let body = json!({"type": "credits.grant.expiring", "name": "soon", "channels": [ch], "before": "P1D"});
    let (status, body) = ledger.post(RULES, body).await;
    assert_eq!(status, 201, "{body}");
    let soon = body["id"].as_str().expect("id").to_owned();
    let (first, second) = (ledger.customer("first").await, ledger.customer("second").await);
    ledger.grant(&first, grant_body("10", json!({"expires_after": "PT1H"}))).await;
    charge(&ledger, &first, "6", "a").await;
    ledger.grant(&second, grant_body("10", json!({}))).await;
    charge(&ledger, &second, "6", "a").await;
    let now = ledger.db_now().await;
    assert_eq!(ledger::notify::expiring::scan(&ledger.state.db, now).await.expect("scan"), 1);

    let all = events(&ledger, "?page[size]=100").await;
    let seen: Vec<(&Value, &Value, &Value)> =
        all.iter().map(|e| (&e["payload"]["type"], &e["payload"]["data"]["rule"]["id"], &e["customer_id"])).collect();
    assert_eq!(
        seen,
        [
            (&json!("credits.grant.expiring"), &json!(soon), &json!(first)),
            (&json!("credits.balance.threshold"), &json!(low), &json!(second)),
            (&json!("credits.balance.threshold"), &json!(low), &json!(first)),
        ],
        "newest first: {all:#?}"
    );
    let ids = |list: &[Value]| list.iter().map(|e| e["id"].as_str().unwrap_or("?").to_owned()).collect::<Vec<_>>();
    let all_ids = ids(&all);
    let (newest, middle, oldest) = (&all_ids[0], &all_ids[1], &all_ids[2]);
    for (query, expected) in [
        ("?filter[type]=credits.grant.expiring".to_owned(), vec![newest]),
        ("?filter[type]=credits.balance.threshold".to_owned(), vec![middle, oldest]),
        (format!("?filter[rule_id]={low}"), vec![middle, oldest]),
        (format!("?filter[rule_id]={soon}"), vec![newest]),
        (format!("?filter[customer_id]={first}"), vec![newest, oldest]),
        (format!("?filter[customer_id]={first}&filter[type]=credits.balance.threshold"), vec![oldest]),
    ] {
        let found = ids(&events(&ledger, &query).await);
        assert_eq!(found.iter().collect::<Vec<_>>(), expected, "{query}");
    }

    // One at a time: `next` walks to the oldest, `previous` back to the newest.
    let (mut forward, mut link) = (Vec::new(), format!("{EVENTS}?page[size]=1"));
    let last = loop {
        let (status, page) = ledger.get(&link).await;
        assert_eq!(status, 200, "{link}: {page}");
        forward.extend(ids(page["data"].as_array().expect("data")));
        match page["meta"]["page"]["next"].as_str().map(str::to_owned) {
            Some(next) => link = next,
            None => break page,
        }
    };
    assert_eq!(forward, all_ids);
    let mut backward = Vec::new();
    let mut page = last;
    while let Some(previous) = page["meta"]["page"]["previous"].as_str().map(str::to_owned) {
        let (status, body) = ledger.get(&previous).await;
        assert_eq!(status, 200, "{previous}: {body}");
        backward.extend(ids(body["data"].as_array().expect("data")));
        page = body;
    }
    backward.reverse();
    assert_eq!(backward, all_ids[..2].to_vec(), "previous pages, newest last");
}

/// The bounds the README gives channels and rules: a `url` without a fragment, up to 20 custom
/// headers and none HTTP owns (`content-type`, `host`), a `signing_secret` of `whsec_` + base64 of
/// 24–64 bytes, 1–20 thresholds.
async fn channel_and_rule_bounds_are_the_documented_ones(backend: Backend) {
    use base64::Engine as _;
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let secret = |bytes: usize| format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(vec![7u8; bytes]));
    let headers = |n: usize| Value::Object((0..n).map(|i| (format!("x-h{i}"), json!("v"))).collect());
    let webhook = |extra: Value| {
        support::merged(json!({"type": "webhook", "name": "a", "url": "http://127.0.0.1:9/hook"}), extra)
    };
    for (body, field) in [
        (webhook(json!({"url": "http://127.0.0.1:9/hook#part"})), "url"),
        (webhook(json!({"custom_headers": headers(21)})), "custom_headers"),
        (webhook(json!({"custom_headers": {"content-type": "text/plain"}})), "custom_headers.content-type"),
        (webhook(json!({"custom_headers": {"host": "elsewhere"}})), "custom_headers.host"),
        (webhook(json!({"signing_secret": secret(23)})), "signing_secret"),
        (webhook(json!({"signing_secret": secret(65)})), "signing_secret"),
    ] {
        let reply = ledger.call(reqwest::Method::POST, CHANNELS).json(&body).send().await;
        reply.assert_problem(400, Some(field));
    }
    let mut id = String::new();
    for body in [
        webhook(json!({"custom_headers": headers(20)})),
        webhook(json!({"signing_secret": secret(24)})),
        webhook(json!({"signing_secret": secret(64)})),
    ] {
        let (status, made) = ledger.post(CHANNELS, body.clone()).await;
        assert_eq!(status, 201, "{body}: {made}");
        id = made["id"].as_str().expect("id").to_owned();
    }
    let thresholds =
        |n: usize| Value::Array((1..=n).map(|i| json!({"type": "absolute", "value": i.to_string()})).collect());
    let rule = |n: usize| json!({"type": "credits.balance.threshold", "name": "r", "channels": [id], "currency": "USD", "thresholds": thresholds(n)});
    for n in [0, 21] {
        let reply = ledger.call(reqwest::Method::POST, RULES).json(&rule(n)).send().await;
        reply.assert_problem(400, Some("thresholds"));
    }
    for n in [1, 20] {
        let (status, made) = ledger.post(RULES, rule(n)).await;
        assert_eq!(status, 201, "{n} thresholds: {made}");
    }
}

on_both_backends!(
    a_grant_with_nothing_left_is_never_announced_as_expiring,
    a_customer_that_never_had_the_currency_is_not_low,
    notification_events_are_listed_newest_first_by_filter_and_cursor,
    channel_and_rule_bounds_are_the_documented_ones,
    expiring_grants_a_rule_does_not_watch_never_hide_one_it_does,
    a_delivery_without_attempts_left_is_failed_after_the_limit_was_lowered,
    channels_and_rules_are_validated_and_admin_only,
    a_threshold_fires_once_when_crossed_and_rearms_above,
    failed_deliveries_are_retried_with_backoff_and_the_same_webhook_id,
    a_slow_receiver_never_slows_a_booking,
    an_expiring_grant_is_announced_once,
    charges_are_unaffected_by_customers_outside_a_rule,
    every_kind_of_booking_is_evaluated_and_a_changed_rule_rearms,
    redirects_are_not_followed,
    a_dead_instances_claim_runs_out_and_another_delivers,
);
