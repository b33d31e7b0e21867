//! Concurrent charges never over-consume: on SQLite, on PostgreSQL, and with two ledger
//! instances on one PostgreSQL database; two instances book every expiry exactly once and every
//! usage range of nodes that send them the same customers exactly once; a write
//! abandoned while it begins leaves no transaction open; SQLite's writes run on one connection.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{free_port, lease_request, subject_sync, wait_healthy, Backend, Ledger, TestDb, GATEWAY_TOKEN, TOKEN};

/// 50 parallel `credit_only` charges of 1 against a balance of 30, spread over `ledgers`.
async fn fifty_charges_against_thirty(ledgers: &[&Ledger]) {
    let customer = ledgers[0].customer("racer").await;
    ledgers[0]
        .grant(&customer, json!({"name": "thirty", "funding_method": "none", "currency": "USD", "amount": "30"}))
        .await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let ledger = ledgers[i % ledgers.len()];
        let (http, url, customer) = (
            ledger.http.clone(),
            ledger.url(&format!("/v3/openmeter/customers/{customer}/credits/charges")),
            customer.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let body = json!({"amount": "1", "currency": "USD", "settlement_mode": "credit_only", "key": format!("charge-{i}")});
            let resp = http.post(url).bearer_auth(support::TOKEN).json(&body).send().await.expect("request");
            let _ = customer;
            resp.status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("task"));
    }
    let accepted = statuses.iter().filter(|s| **s == 201).count();
    let refused = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((accepted, refused), (30, 20), "statuses: {statuses:?}");
    let (settled, live, _) = ledgers[0].balance(&customer, "").await;
    assert_eq!((settled.as_str(), live.as_str()), ("0", "0"));
    assert!(ledgers[0].check().await.is_empty(), "{:?}", ledgers[0].check().await);
}

async fn parallel_credit_only_charges_stop_exactly_at_the_balance(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    fifty_charges_against_thirty(&[&ledger]).await;
}

on_both_backends!(parallel_credit_only_charges_stop_exactly_at_the_balance, copies_of_one_request_at_once_book_once);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_database_never_over_consume() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (Ledger::start(&db).await, Ledger::start(&db).await);
    fifty_charges_against_thirty(&[&a, &b]).await;
}

/// How many copies of one request [`one_request_sent_many_times_at_once_books_once`] sends at once.
const COPIES: usize = 12;

/// `COPIES` copies of one request at once, spread over `ledgers`, with the admin token;
/// `(status, body)` of each.
async fn at_once(
    ledgers: &[&Ledger],
    method: reqwest::Method,
    path: &str,
    body: Option<&serde_json::Value>,
    headers: &[(&str, &str)],
) -> Vec<(u16, serde_json::Value)> {
    let mut tasks = Vec::new();
    for i in 0..COPIES {
        let ledger = ledgers[i % ledgers.len()];
        let mut request = ledger.http.request(method.clone(), ledger.url(path)).bearer_auth(TOKEN);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(b) = body {
            request = request.json(b);
        }
        tasks.push(tokio::spawn(async move {
            let resp = request.send().await.expect("request");
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    answers
}

/// The customer's settled and live balance are both `expected`.
async fn assert_balance(ledger: &Ledger, customer: &str, expected: &str) {
    let (settled, live, _) = ledger.balance(customer, "").await;
    let expected = support::amount(&json!(expected));
    assert_eq!((support::amount(&json!(settled)), support::amount(&json!(live))), (expected, expected));
}

/// A client that timed out and sent its request again while the first was still in flight, many
/// times over (README: "A retry with the same `key` returns the original answer and books
/// nothing"; adjustments' `Idempotency-Key`; a grant `key` re-used is 409; the per-call
/// authorization is idempotent on `x-request-id`): every copy of a charge, an adjustment and an
/// authorization gets the one original answer and the credit moves once; of the copies of a
/// keyed grant exactly one is made and every other is a 409 naming `key`.
async fn one_request_sent_many_times_at_once_books_once(ledgers: &[&Ledger]) {
    let first = ledgers[0];
    let c = first.customer("impatient").await;
    first.grant(&c, support::grant_body("100", json!({}))).await;
    let customer = support::customer_path(&c);
    let post = reqwest::Method::POST;

    let charge = json!({"amount": "7.50", "currency": "USD", "settlement_mode": "credit_only", "key": "order-1"});
    let answers = at_once(ledgers, post.clone(), &format!("{customer}/credits/charges"), Some(&charge), &[]).await;
    assert!(answers.iter().all(|(status, body)| *status == 201 && *body == answers[0].1), "{answers:#?}");
    assert_balance(first, &c, "92.50").await;

    let adjustment = json!({"name": "Goodwill", "currency": "USD", "amount": "2"});
    let path = format!("{customer}/credits/adjustments");
    let answers = at_once(ledgers, post.clone(), &path, Some(&adjustment), &[("Idempotency-Key", "goodwill-1")]).await;
    assert!(answers.iter().all(|(status, body)| *status == 201 && *body == answers[0].1), "{answers:#?}");
    assert_balance(first, &c, "94.50").await;

    let grant = support::grant_body("5", json!({"key": "top-up-1"}));
    let answers = at_once(ledgers, post.clone(), &format!("{customer}/credits/grants"), Some(&grant), &[]).await;
    let made = answers.iter().filter(|(status, _)| *status == 201).count();
    assert_eq!(made, 1, "{answers:#?}");
    assert!(
        answers.iter().all(|(status, body)| *status == 201 || (*status == 409 && body["field"] == "key")),
        "{answers:#?}"
    );
    assert_balance(first, &c, "99.50").await;

    let call = [
        ("x-credits-price", "0.40"),
        ("x-credits-currency", "USD"),
        ("x-consumer-username", "impatient-subject"),
        ("x-request-id", "call-1"),
    ];
    let answers = at_once(ledgers, reqwest::Method::GET, "/v3/gateway/authorize/api/things", None, &call).await;
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:#?}");
    assert_balance(first, &c, "99.10").await;

    // Funded 100, one charge, one adjustment, one grant, one authorized call.
    assert_eq!(first.all_transactions(&c).await.len(), 5);
    for ledger in ledgers {
        ledger.assert_journal_sound().await;
    }
}

async fn copies_of_one_request_at_once_book_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    one_request_sent_many_times_at_once_books_once(&[&ledger]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copies_of_one_request_at_once_on_two_instances_book_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (Ledger::start(&db).await, Ledger::start(&db).await);
    one_request_sent_many_times_at_once_books_once(&[&a, &b]).await;
}

/// Four gateway nodes, two on each of two instances on one PostgreSQL, send usage for the same
/// customers at once, each sync twice (a node that lost the answer): the instances wait on each
/// other's customer locks, and every range books exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_syncing_the_same_customers_book_every_range_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (Ledger::start(&db).await, Ledger::start(&db).await);
    let customers: Vec<String> = (0..40).map(|i| format!("shared{i:02}")).collect();
    let mut ids = Vec::new();
    for c in &customers {
        let id = a.customer(c).await;
        a.grant(&id, json!({"name": "ten", "funding_method": "none", "currency": "USD", "amount": "10"})).await;
        ids.push(id);
    }
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let mut nodes = Vec::new();
    for node in 0..4usize {
        let ledger = if node % 2 == 0 { a.clone() } else { b.clone() };
        let customers = customers.clone();
        nodes.push(tokio::spawn(async move {
            for round in 0..10u64 {
                // Each node in an order of its own, as nodes behind one load balancer meet them.
                let mut order: Vec<&String> = customers.iter().collect();
                order.rotate_left((node * 10 + round as usize * 3) % customers.len());
                let subjects: Vec<_> = order
                    .iter()
                    .map(|c| {
                        subject_sync(
                            &format!("{c}-subject"),
                            json!({"usage": support::usage_range(round, round + 1, "0.10", "credit_only")}),
                        )
                    })
                    .collect();
                let body = json!({"node": format!("node-{node}"), "subjects": subjects});
                for expected in ["booked", "duplicate"] {
                    let (status, answer) = ledger.sync(body.clone()).await;
                    assert_eq!(status, 200, "{answer}");
                    let answers = answer["subjects"].as_array().expect("subjects");
                    assert!(answers.iter().all(|s| s["usage"] == expected), "{expected}: {answer}");
                }
            }
        }));
    }
    for node in nodes {
        node.await.expect("node");
    }
    for id in &ids {
        // 4 nodes × 10 ranges × 0.10.
        assert_eq!(a.balance(id, "").await.1, "6.00", "{id}");
    }
    assert!(a.check().await.is_empty(), "{:?}", a.check().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_book_each_expiry_exactly_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let (a, b) = (Ledger::start(&db).await, Ledger::start(&db).await);
    let mut customers = Vec::new();
    for i in 0..20 {
        let c = a.customer(&format!("expiring-{i}")).await;
        a.grant(&c, json!({"name": "short", "funding_method": "none", "currency": "USD", "amount": "5", "expires_after": "PT1S"})).await;
        customers.push(c);
    }
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    // Both instances run the expiry job at the same time, several passes each.
    let (sa, sb) = (a.state.clone(), b.state.clone());
    let runs = (0..3)
        .flat_map(|_| [sa.clone(), sb.clone()])
        .map(|s| tokio::spawn(async move { ledger::expiry::pass(&s).await.expect("pass") }));
    let booked: usize = futures_total(runs.collect()).await;
    assert_eq!(booked, 20, "each of the 20 expiries booked once in total");
    for c in &customers {
        let (status, body) =
            a.get(&format!("/v3/openmeter/customers/{c}/credits/transactions?filter[type]=expired")).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    }
    assert!(a.check().await.is_empty());
}

async fn futures_total(handles: Vec<tokio::task::JoinHandle<usize>>) -> usize {
    let mut total = 0;
    for h in handles {
        total += h.await.expect("join");
    }
    total
}

/// A `credits-ledger serve` process whose expiry job runs every 20 ms; `(process, base URL)`.
async fn serving_process(db: &TestDb) -> (Child, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_credits-ledger"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database", &db.url, "--expiry-interval-ms", "20"])
        .args(["--token", TOKEN, "--gateway-token", GATEWAY_TOKEN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn credits-ledger");
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&reqwest::Client::new(), &base).await;
    (child, base)
}

/// A counter (`credits_ledger_…` line of `GET /metrics`, labels included) of the process at `base`.
async fn metric(base: &str, line_prefix: &str) -> u64 {
    let text = reqwest::get(format!("{base}/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines().find_map(|l| l.strip_prefix(line_prefix)).map_or(0, |n| n.trim().parse().expect("counter"))
}

/// Two real processes on one PostgreSQL database, both running the expiry job: every lease that
/// runs out and every grant that expires is booked once in all, by one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_serving_processes_book_every_expiry_and_lease_expiry_once() {
    let db = TestDb::new(Backend::Postgres).await;
    // Set up through an instance without the expiry job.
    let setup = Ledger::start(&db).await;
    let customers = 12;
    let mut ids = Vec::new();
    for i in 0..customers {
        let c = setup.customer(&format!("due-{i}")).await;
        let grant = json!({"name": "short", "funding_method": "none", "currency": "USD", "amount": "5", "expires_after": "PT2S"});
        setup.grant(&c, grant).await;
        let lease = subject_sync(
            &format!("due-{i}-subject"),
            json!({"lease": lease_request(&format!("lease-{i}"), 1, "1.00", 300)}),
        );
        let answer = setup.sync_one("node-a", lease).await;
        assert_eq!(answer["lease"]["granted"], "1.00", "{answer}");
        ids.push(c);
    }
    let (mut a, base_a) = serving_process(&db).await;
    let (mut b, base_b) = serving_process(&db).await;
    let (expired, leases) =
        ("credits_ledger_bookings_total{kind=\"expired\"} ", "credits_ledger_leases_expired_unreported_total ");
    let total = |prefix: &'static str| {
        let (base_a, base_b) = (base_a.clone(), base_b.clone());
        async move { metric(&base_a, prefix).await + metric(&base_b, prefix).await }
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while (total(expired).await < customers || total(leases).await < customers) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Many more passes of both jobs change nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(total(leases).await, customers, "every lease closed once, by one of the two");
    assert_eq!(total(expired).await, customers, "every grant expiry booked once, by one of the two");
    let (by_a, by_b) = (metric(&base_a, expired).await, metric(&base_b, expired).await);
    let _ = (a.kill(), b.kill(), a.wait(), b.wait());
    for (i, c) in ids.iter().enumerate() {
        let (_, _, closed) = setup.lease_row(&format!("lease-{i}")).await.expect("lease row");
        assert!(closed, "lease-{i} closed");
        let history = setup.transactions(c, "?filter[type]=expired").await;
        assert_eq!(support::column(&history, "amount"), ["-5"], "{history}");
    }
    setup.assert_journal_sound().await;
    println!("expiries booked: {by_a} by one instance, {by_b} by the other");
}

/// A write whose caller goes away while its transaction begins (a gateway's sync that timed out:
/// the server drops the handler's future) must not leave its connection inside a transaction:
/// on SQLite that transaction holds the write lock, and every later write would wait it out
/// ("database is locked") until the connection is recycled — the ledger stalled for minutes under
/// `bench/gateway.py` on a slow machine before this was fixed.
#[tokio::test]
async fn a_write_abandoned_while_it_begins_leaves_no_transaction_open() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let test_db = TestDb::new(backend).await;
        let db = ledger::db::Db::connect(&test_db.url).await.expect("connect");
        // Abandoned at every stage of beginning, from before the pool hands out a connection to
        // after the database began the transaction.
        for i in 0..600u64 {
            let begun = tokio::time::timeout(Duration::from_micros(i * 7 % 1500), db.begin_write()).await;
            if let Ok(Ok(tx)) = begun {
                drop(tx);
            }
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        // Every connection of the pool still begins, writes and commits at once.
        for i in 0..12 {
            let mut tx = tokio::time::timeout(Duration::from_secs(3), db.begin_write())
                .await
                .unwrap_or_else(|_| panic!("{backend:?}: write {i} waited for a transaction left open"))
                .unwrap_or_else(|e| panic!("{backend:?}: write {i} could not begin: {e}"));
            sqlx::query("CREATE TABLE IF NOT EXISTS abandoned_begins (n INTEGER)")
                .execute(&mut *tx.tx)
                .await
                .expect("write");
            sqlx::query("INSERT INTO abandoned_begins (n) VALUES (1)").execute(&mut *tx.tx).await.expect("write");
            tx.commit().await.expect("commit");
        }
    }
}

/// SQLite empties a connection's page cache when another connection has written since its last
/// transaction, so the ledger runs every write on one connection of its own: each write finds
/// the pages the one before it left instead of reading them back (bench/RESULTS.md §0s). A
/// temporary table is seen by the connection that made it alone.
#[tokio::test]
async fn sqlite_writes_all_run_on_one_connection() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let db = ledger::db::Db::connect(&test_db.url).await.expect("connect");
    // Several idle connections, as a busy ledger has: its reads hold them at once.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(db.pool().acquire().await.expect("connection"));
    }
    drop(held);
    for i in 0..8 {
        let mut tx = db.begin_write().await.expect("begin");
        let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM temp.sqlite_master WHERE name = 'writer_marker'")
            .fetch_one(&mut *tx.tx)
            .await
            .expect("read");
        assert_eq!(seen, i64::from(i > 0), "write {i} ran on another connection than the writes before it");
        sqlx::query("CREATE TEMP TABLE IF NOT EXISTS writer_marker (n INTEGER)")
            .execute(&mut *tx.tx)
            .await
            .expect("write");
        tx.commit().await.expect("commit");
        // A read between writes, on the pool.
        let mut conn = db.pool().acquire().await.expect("connection");
        sqlx::query("SELECT 1").execute(&mut *conn).await.expect("read");
    }
}
