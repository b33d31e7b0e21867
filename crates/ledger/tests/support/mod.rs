//! Test support: a real ledger (in-process HTTP server) on a fresh SQLite file or a fresh
//! PostgreSQL database that is dropped afterwards.
#![allow(dead_code)]

pub mod receiver;
pub mod webdriver;

use std::time::Duration;

use ledger::api::{AppState, Auth};
use serde_json::{json, Value};

pub const TOKEN: &str = "test-token";
/// A second admin token (rotation: both are valid).
pub const NEXT_TOKEN: &str = "test-token-next";
/// The gateway's tokens: customer look-ups, balances, usage and leases only.
pub const GATEWAY_TOKEN: &str = "test-gateway-token";
pub const NEXT_GATEWAY_TOKEN: &str = "test-gateway-token-next";

/// Where PostgreSQL tests create their databases (trust auth on this machine kind).
pub fn postgres_admin_url() -> String {
    std::env::var("CREDITS_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: String,
    cleanup: Option<Box<dyn FnOnce() + Send>>,
    _dir: Option<tempdir::TempDir>,
}

pub mod tempdir {
    /// A directory removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl TempDir {
        pub fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("credits-ledger-test-{}", ulid::Ulid::new()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempdir::TempDir::new();
                let url = format!("sqlite://{}", dir.0.join("ledger.db").display());
                TestDb { url, cleanup: None, _dir: Some(dir) }
            }
            Backend::Postgres => {
                let admin = postgres_admin_url();
                let name = format!("credits_test_{}", ulid::Ulid::new().to_string().to_lowercase());
                sqlx::any::install_default_drivers();
                let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin)
                    .await
                    .unwrap_or_else(|e| panic!("PostgreSQL must be running at {admin}: {e}"));
                sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create database");
                let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(admin.clone());
                let url = format!("{base}/{name}");
                let cleanup = move || {
                    let drop_db = async move {
                        if let Ok(mut conn) = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await {
                            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut conn)
                                .await;
                        }
                    };
                    let _ = std::thread::spawn(move || {
                        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                            rt.block_on(drop_db);
                        }
                    })
                    .join();
                };
                TestDb { url, cleanup: Some(Box::new(cleanup)), _dir: None }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            cleanup();
        }
    }
}

/// A running ledger and a client for it.
pub struct Ledger {
    pub base: String,
    pub http: reqwest::Client,
    pub state: AppState,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Ledger {
    pub async fn start(db: &TestDb) -> Ledger {
        Ledger::start_with(db, ledger::api::request::DEFAULT_MAX_BODY_BYTES).await
    }

    /// A ledger that reads request bodies up to `max_body_bytes`.
    pub async fn start_with(db: &TestDb, max_body_bytes: usize) -> Ledger {
        let auth = Auth::tokens(&[TOKEN, NEXT_TOKEN], &[GATEWAY_TOKEN, NEXT_GATEWAY_TOKEN]).expect("tokens");
        let mut state = ledger::state(&db.url, auth).await.expect("ledger state");
        state.max_body_bytes = max_body_bytes;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let app = ledger::api::router(state.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");
        Ledger { base, http, state, server }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut call = self.call(method, path);
        if let Some(b) = body {
            call = call.json(&b);
        }
        let reply = call.send().await;
        (reply.status, reply.body)
    }

    /// A request with the valid bearer token, to be completed and sent.
    pub fn call(&self, method: reqwest::Method, path: &str) -> Call {
        Call(self.http.request(method, self.url(path)).bearer_auth(TOKEN))
    }

    /// A request with `token` as the bearer token.
    pub fn call_as(&self, token: &str, method: reqwest::Method, path: &str) -> Call {
        Call(self.http.request(method, self.url(path)).bearer_auth(token))
    }

    /// A request without any Authorization header.
    pub fn call_without_token(&self, method: reqwest::Method, path: &str) -> Call {
        Call(self.http.request(method, self.url(path)))
    }

    pub async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::PUT, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::DELETE, path, None).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    /// Creates a customer with one subject key; returns its id.
    pub async fn customer(&self, key: &str) -> String {
        let (status, body) = self
            .post(
                "/v3/openmeter/customers",
                json!({"name": key, "key": key, "usage_attribution": {"subject_keys": [format!("{key}-subject")]}}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().expect("id").to_owned()
    }

    pub async fn grant(&self, customer: &str, body: Value) -> Value {
        let (status, body) = self.post(&format!("/v3/openmeter/customers/{customer}/credits/grants"), body).await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// Settled, live, pending of one currency.
    pub async fn balance(&self, customer: &str, query: &str) -> (String, String, String) {
        let (status, body) = self.get(&format!("/v3/openmeter/customers/{customer}/credits/balance{query}")).await;
        assert_eq!(status, 200, "{body}");
        let b = &body["balances"][0];
        (
            b["settled"].as_str().unwrap_or("none").to_owned(),
            b["live"].as_str().unwrap_or("none").to_owned(),
            b["pending"].as_str().unwrap_or("none").to_owned(),
        )
    }

    pub async fn charge(&self, customer: &str, amount: &str, key: &str) -> (u16, Value) {
        self.post(
            &format!("/v3/openmeter/customers/{customer}/credits/charges"),
            json!({"amount": amount, "currency": "USD", "settlement_mode": "credit_only", "key": key}),
        )
        .await
    }

    pub async fn check(&self) -> Vec<String> {
        ledger::check::run(&self.state.db).await.expect("check runs")
    }

    /// The journal invariant checker finds nothing wrong, and every book the ledger kept from a
    /// gateway sync is, while its revision is current, exactly the book the store gives back.
    pub async fn assert_journal_sound(&self) {
        let problems = self.check().await;
        assert!(problems.is_empty(), "journal check: {problems:?}");
        self.assert_kept_books_current().await;
    }

    async fn assert_kept_books_current(&self) {
        let kept = self.state.books.entries();
        let ids: Vec<String> = kept.iter().map(|(id, _, _, _)| id.clone()).collect();
        let mut conn = self.state.db.pool().acquire().await.expect("connection");
        let stored = ledger::store::books::load_books(&mut conn, &ids).await.expect("books");
        for (id, revision, book, marks) in kept {
            let version: i64 = sqlx::query_scalar("SELECT lock_version FROM customers WHERE id = $1")
                .bind(&id)
                .fetch_one(&mut *conn)
                .await
                .expect("revision");
            // A book changed since it was kept is read again under the next lock.
            if version == revision {
                assert_eq!(Some(&book), stored.get(&id), "the book kept for {id} at revision {revision}");
                let streams: Vec<&str> = marks.keys().map(String::as_str).collect();
                let stored_marks = ledger::store::usage::marks(&mut conn, &streams).await.expect("marks");
                assert_eq!(marks, stored_marks, "the marks kept for {id} at revision {revision}");
            }
        }
    }

    /// A charge with any body; `(status, body)`.
    pub async fn charge_with(&self, customer: &str, body: Value) -> (u16, Value) {
        self.post(&format!("{}/credits/charges", customer_path(customer)), body).await
    }

    /// An adjustment; asserts 201.
    pub async fn adjust(&self, customer: &str, body: Value) -> Value {
        let (status, body) = self.post(&format!("{}/credits/adjustments", customer_path(customer)), body).await;
        assert_eq!(status, 201, "{body}");
        body
    }

    /// All balances (one per currency) for a query such as `?filter[currency][eq]=USD`.
    pub async fn balances(&self, customer: &str, query: &str) -> Value {
        let (status, body) = self.get(&format!("{}/credits/balance{query}", customer_path(customer))).await;
        assert_eq!(status, 200, "{body}");
        body["balances"].clone()
    }

    /// The settled balance of the only currency at `at` (RFC 3339), or "none" if there is none.
    pub async fn settled_at(&self, customer: &str, at: &str) -> String {
        self.balance(customer, &format!("?timestamp={}", enc(at))).await.0
    }

    /// One page of the transaction history with the ledger's extensions (`grant_id`,
    /// `feature_key`); asserts 200.
    pub async fn transactions(&self, customer: &str, query: &str) -> Value {
        let extended = format!("{query}{}extensions=true", if query.contains('?') { '&' } else { '?' });
        let (status, body) = self.get(&format!("{}/credits/transactions{extended}", customer_path(customer))).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The whole transaction history, newest first, following `next` links.
    pub async fn all_transactions(&self, customer: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut body = self.transactions(customer, "?page[size]=50").await;
        loop {
            items.extend(body["data"].as_array().expect("data").iter().cloned());
            match body["meta"]["page"]["next"].as_str() {
                Some(next) => {
                    let (status, next_body) = self.get(next).await;
                    assert_eq!(status, 200, "{next_body}");
                    body = next_body;
                }
                None => return items,
            }
        }
    }

    /// Rows per table: anything booked, stored or recorded shows up here.
    pub async fn row_counts(&self) -> Value {
        let mut counts = serde_json::Map::new();
        for table in [
            "customers",
            "customer_subjects",
            "grants",
            "movements",
            "postings",
            "overages",
            "debts",
            "debt_covers",
            "holds",
            "idempotency_records",
            "events",
            "usage_records",
            "usage_marks",
        ] {
            let n: i64 = sqlx::Row::try_get(
                &sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
                    .fetch_one(self.state.db.pool())
                    .await
                    .expect("count"),
                0,
            )
            .expect("count value");
            counts.insert(table.to_owned(), json!(n));
        }
        Value::Object(counts)
    }

    /// Everything a request could have changed for a customer: row counts, balances, history,
    /// grants. Compare before and after a refused request.
    pub async fn snapshot(&self, customer: &str) -> Value {
        let (status, grants) = self.get(&format!("{}/credits/grants", customer_path(customer))).await;
        assert_eq!(status, 200, "{grants}");
        json!({
            "rows": self.row_counts().await,
            "balances": self.balances(customer, "").await,
            "transactions": self.all_transactions(customer).await,
            "grants": grants["data"],
        })
    }

    /// The database clock (the one every booking uses).
    pub async fn db_now(&self) -> chrono::DateTime<chrono::Utc> {
        let mut conn = self.state.db.pool().acquire().await.expect("connection");
        self.state.db.now(&mut conn).await.expect("now")
    }

    /// `POST /v3/gateway/sync` with any body; `(status, body)`.
    pub async fn sync(&self, body: Value) -> (u16, Value) {
        self.post("/v3/gateway/sync", body).await
    }

    /// A sync by `node` about one subject; asserts 200 and returns that subject's answer.
    pub async fn sync_one(&self, node: &str, subject: Value) -> Value {
        let (status, body) = self.sync(json!({"node": node, "subjects": [subject]})).await;
        assert_eq!(status, 200, "{body}");
        let answers = body["subjects"].as_array().unwrap_or_else(|| panic!("no subjects in {body}"));
        assert_eq!(answers.len(), 1, "{body}");
        answers[0].clone()
    }

    /// A counter of `GET /metrics` (`credits_ledger_<name>_total`); 0 while it was never counted.
    pub async fn counter(&self, name: &str) -> u64 {
        let metrics = self.call_without_token(reqwest::Method::GET, "/metrics").send().await;
        assert_eq!(metrics.status, 200, "{}", metrics.text);
        let prefix = format!("credits_ledger_{name}_total ");
        metrics
            .text
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |n| n.parse().unwrap_or_else(|e| panic!("counter {name}: {n:?}: {e}")))
    }

    /// A usage stream's stored mark: `(booked_to, keyed)`, or `None` if it has none.
    pub async fn usage_mark(&self, stream: &str) -> Option<(i64, bool)> {
        let row = sqlx::query("SELECT booked_to, keyed FROM usage_marks WHERE stream = $1")
            .bind(stream)
            .fetch_optional(self.state.db.pool())
            .await
            .expect("usage mark row");
        row.map(|r| {
            let get = |i: usize| sqlx::Row::try_get::<i64, _>(&r, i).expect("column");
            (get(0), get(1) != 0)
        })
    }

    /// The stored lease (hold) row: `(customer_id, amount, closed)`, or `None` if there is none.
    pub async fn lease_row(&self, lease_id: &str) -> Option<(String, String, bool)> {
        let row = sqlx::query("SELECT customer_id, amount, released_at FROM holds WHERE id = $1")
            .bind(lease_id)
            .fetch_optional(self.state.db.pool())
            .await
            .expect("hold row");
        row.map(|r| {
            let get = |c: &str| sqlx::Row::try_get::<String, _>(&r, c).expect("column");
            let released: Option<i64> = sqlx::Row::try_get(&r, "released_at").expect("released_at");
            (get("customer_id"), get("amount"), released.is_some())
        })
    }

    /// Waits until the database clock is past `instant` (SQLite's clock ticks in milliseconds, so
    /// two bookings in a row may share an instant).
    pub async fn wait_past(&self, instant: &str) {
        let instant = parse_time(instant);
        while self.db_now().await <= instant {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// A request being built; see [`Ledger::call`].
pub struct Call(reqwest::RequestBuilder);

impl Call {
    pub fn header(self, name: &str, value: &str) -> Call {
        Call(self.0.header(name, value))
    }

    pub fn json(self, body: &Value) -> Call {
        Call(self.0.json(body))
    }

    /// A body with an explicit content type (or none at all).
    pub fn body(self, content_type: Option<&str>, bytes: impl Into<Vec<u8>>) -> Call {
        let req = match content_type {
            Some(ct) => self.0.header(reqwest::header::CONTENT_TYPE, ct),
            None => self.0,
        };
        Call(req.body(bytes.into()))
    }

    pub async fn send(self) -> Reply {
        let resp = self.0.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let content_type =
            headers.get(reqwest::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        Reply { status, content_type, headers, text, body }
    }
}

/// A response with everything a test may look at.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub body: Value,
}

impl Reply {
    /// An RFC 9457 problem with this status, naming `field` (or no field at all for `None`).
    pub fn assert_problem(&self, status: u16, field: Option<&str>) -> &Reply {
        assert_problem(self.status, &self.content_type, &self.body, status, field);
        self
    }
}

/// Asserts an `application/problem+json` answer: status, title, detail, and the field at fault.
pub fn assert_problem(got_status: u16, content_type: &str, body: &Value, status: u16, field: Option<&str>) {
    assert_eq!(got_status, status, "status of {body}");
    assert_eq!(content_type, "application/problem+json", "content type of {body}");
    assert_eq!(body["status"], json!(status), "{body}");
    let title = reqwest::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error");
    assert_eq!(body["title"], json!(title), "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "detail in {body}");
    assert!(body["instance"].as_str().is_some_and(|d| !d.is_empty()), "instance in {body}");
    match field {
        Some(f) => {
            assert_eq!(body["field"], json!(f), "field of {body}");
            if status == 400 {
                assert_eq!(body["invalid_parameters"][0]["field"], json!(f), "{body}");
            }
        }
        None => assert!(body.get("field").is_none(), "no field expected in {body}"),
    }
}

/// An endpoint behind the tokens, with a body it would accept.
pub struct ProtectedCall {
    pub method: reqwest::Method,
    pub path: String,
    pub body: Option<Value>,
    /// Whether a gateway token may call it (an admin token may call every one).
    pub gateway: bool,
}

/// Every endpoint behind the tokens, for customer `c` and its grant `g`.
pub fn protected_calls(c: &str, g: &str) -> Vec<ProtectedCall> {
    use reqwest::Method;
    let customer = customer_path(c);
    let call = |method: Method, path: String, body: Option<Value>, gateway: bool| ProtectedCall {
        method,
        path,
        body,
        gateway,
    };
    let charge = json!({"amount": "1", "currency": "USD", "settlement_mode": "credit_only", "key": "new"});
    let event = json!({"id": "e", "source": "s", "specversion": "1.0", "type": "t", "subject": "x"});
    vec![
        call(Method::POST, "/v3/openmeter/customers".into(), Some(json!({"name": "n", "key": "new"})), false),
        call(Method::GET, "/v3/openmeter/customers".into(), None, true),
        call(Method::GET, customer.clone(), None, true),
        call(Method::PUT, customer.clone(), Some(json!({"name": "renamed"})), false),
        call(Method::DELETE, customer.clone(), None, false),
        call(Method::POST, format!("{customer}/credits/grants"), Some(grant_body("1", json!({}))), false),
        call(Method::GET, format!("{customer}/credits/grants"), None, false),
        call(Method::GET, format!("{customer}/credits/grants/{g}"), None, false),
        call(
            Method::POST,
            format!("{customer}/credits/grants/{g}/settlement/external"),
            Some(json!({"status": "settled"})),
            false,
        ),
        call(Method::POST, format!("{customer}/credits/grants/{g}/void"), None, false),
        call(Method::GET, format!("{customer}/credits/balance"), None, true),
        call(Method::GET, format!("{customer}/credits/transactions"), None, false),
        call(
            Method::POST,
            format!("{customer}/credits/adjustments"),
            Some(json!({"name": "fix", "currency": "USD", "amount": "1"})),
            false,
        ),
        call(Method::POST, format!("{customer}/credits/charges"), Some(charge), false),
        call(Method::POST, "/v3/openmeter/events".into(), Some(event), true),
        call(Method::GET, "/v3/openmeter/events".into(), None, false),
        call(Method::POST, "/v3/gateway/sync".into(), Some(json!({"node": "n", "subjects": []})), true),
    ]
}

/// `/v3/openmeter/customers/{id}`.
pub fn customer_path(id: &str) -> String {
    format!("/v3/openmeter/customers/{id}")
}

/// Percent-encodes a query value.
pub fn enc(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

pub fn parse_time(text: &str) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}")).to_utc()
}

/// RFC 3339 with microseconds, as the ledger stores instants.
pub fn format_time(at: chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// `text` moved by `micros` microseconds.
pub fn shift(text: &str, micros: i64) -> String {
    format_time(parse_time(text) + chrono::TimeDelta::microseconds(micros))
}

/// A well-formed ULID that no resource has.
pub const UNKNOWN_ID: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

/// A promotional USD grant of `amount`, with `extra` fields merged in.
pub fn grant_body(amount: &str, extra: Value) -> Value {
    merged(json!({"name": "grant", "funding_method": "none", "currency": "USD", "amount": amount}), extra)
}

/// `base` with the members of `extra` set (a `null` member removes it).
pub fn merged(base: Value, extra: Value) -> Value {
    let mut out = base;
    if let (Value::Object(o), Value::Object(e)) = (&mut out, extra) {
        for (k, v) in e {
            if v.is_null() {
                o.remove(&k);
            } else {
                o.insert(k, v);
            }
        }
    }
    out
}

/// The `data` array of a list answer.
pub fn data(body: &Value) -> &Vec<Value> {
    body["data"].as_array().unwrap_or_else(|| panic!("no data array in {body}"))
}

/// One string member of every item of a list answer.
pub fn column(body: &Value, member: &str) -> Vec<String> {
    data(body).iter().map(|item| item[member].as_str().unwrap_or("?").to_owned()).collect()
}

/// One subject of a gateway sync in USD, with `extra` members (`usage`, `lease`, …) merged in.
pub fn subject_sync(subject: &str, extra: Value) -> Value {
    merged(json!({"subject": subject, "currency": "USD"}), extra)
}

/// A usage range `from..to` priced `amount` in total.
pub fn usage_range(from: u64, to: u64, amount: &str, settlement_mode: &str) -> Value {
    json!({"from": from, "to": to, "amount": amount, "settlement_mode": settlement_mode})
}

/// A lease request (open, top up or renew).
pub fn lease_request(lease_id: &str, seq: u64, want: &str, ttl_ms: u64) -> Value {
    json!({"lease_id": lease_id, "seq": seq, "want": want, "ttl_ms": ttl_ms})
}

/// (type, amount, grant_id or "-", balance before, balance after) of history items.
pub fn summary(items: &[Value]) -> Vec<(String, String, String, String, String)> {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    items
        .iter()
        .map(|t| {
            (
                s(&t["type"]),
                s(&t["amount"]),
                s(&t["grant_id"]),
                s(&t["available_balance"]["before"]),
                s(&t["available_balance"]["after"]),
            )
        })
        .collect()
}

/// One [`summary`] row.
pub fn row(
    kind: &str,
    amount: &str,
    grant: &str,
    before: &str,
    after: &str,
) -> (String, String, String, String, String) {
    (kind.into(), amount.into(), grant.into(), before.into(), after.into())
}

/// A decimal amount from the wire.
pub fn amount(v: &Value) -> credits::Amount {
    let text = v.as_str().unwrap_or_else(|| panic!("{v} is not an amount string"));
    credits::Amount::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Waits until the ledger at `base` answers its health check.
pub async fn wait_healthy(http: &reqwest::Client, base: &str) {
    for _ in 0..200 {
        if http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("ledger at {base} did not become healthy");
}

/// Generates one test per backend from an async scenario `fn(Backend)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}
