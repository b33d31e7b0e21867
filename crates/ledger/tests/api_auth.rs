//! Tokens and limits: an admin token may call every endpoint, a gateway token only what a
//! gateway needs (anything else is a 403 problem that changes nothing); several tokens per scope
//! are valid at once (rotation); no answer and no log line repeats a token; request bodies are
//! bounded by `--max-body-bytes`; the process refuses settings it cannot honour.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::{Client, Method};
use serde_json::json;
use support::{
    customer_path, free_port, grant_body, protected_calls, subject_sync, usage_range, wait_healthy, Backend, Ledger,
    ProtectedCall, TestDb, GATEWAY_TOKEN, NEXT_GATEWAY_TOKEN, NEXT_TOKEN, TOKEN,
};

/// A customer with credit and one charge booked; `(customer, grant)`.
async fn funded_customer(ledger: &Ledger) -> (String, String) {
    let c = ledger.customer("scoped").await;
    let g = ledger.grant(&c, grant_body("10", json!({}))).await;
    assert_eq!(ledger.charge(&c, "2.50", "first").await.0, 201);
    (c, g["id"].as_str().expect("id").to_owned())
}

async fn send(ledger: &Ledger, token: &str, call: &ProtectedCall) -> support::Reply {
    let mut request = ledger.call_as(token, call.method.clone(), &call.path);
    if let Some(body) = &call.body {
        request = request.json(body);
    }
    request.send().await
}

async fn gateway_tokens_are_refused_outside_their_scope(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, g) = funded_customer(&ledger).await;
    let before = ledger.snapshot(&c).await;
    let calls = protected_calls(&c, &g);
    for call in calls.iter().filter(|call| !call.gateway) {
        for token in [GATEWAY_TOKEN, NEXT_GATEWAY_TOKEN] {
            let reply = send(&ledger, token, call).await;
            assert_eq!(reply.status, 403, "{} {} with a gateway token: {}", call.method, call.path, reply.body);
            reply.assert_problem(403, None);
            assert!(!reply.text.contains(token), "the token is not echoed: {}", reply.text);
        }
    }
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked, stored or changed");
    // In scope: both gateway tokens work (HEAD goes with GET).
    for (i, call) in calls.iter().filter(|call| call.gateway).enumerate() {
        let token = [GATEWAY_TOKEN, NEXT_GATEWAY_TOKEN][i % 2];
        let reply = send(&ledger, token, call).await;
        assert!((200..300).contains(&reply.status), "{} {}: {} {}", call.method, call.path, reply.status, reply.body);
    }
    let head = ledger.call_as(GATEWAY_TOKEN, Method::HEAD, &format!("{}/credits/balance", customer_path(&c))).send();
    assert_eq!(head.await.status, 200);
    ledger.assert_journal_sound().await;
}

async fn admin_tokens_may_call_every_endpoint(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    // One customer per call, so that no call (a DELETE, a void) spoils the next one.
    for (i, token) in [TOKEN, NEXT_TOKEN].into_iter().enumerate() {
        for index in 0..protected_calls("c", "g").len() {
            let c = ledger.customer(&format!("admin-{i}-{index}")).await;
            let g = ledger
                .grant(
                    &c,
                    grant_body(
                        "10",
                        json!({"funding_method": "external",
                "purchase": {"currency": "USD", "per_unit_cost_basis": "1"}}),
                    ),
                )
                .await;
            let mut call = protected_calls(&c, g["id"].as_str().expect("id")).swap_remove(index);
            // Keys and idempotency must not collide between the rounds.
            if call.path == "/v3/openmeter/customers" && call.method == Method::POST {
                call.body = Some(json!({"name": "n", "key": format!("new-{i}")}));
            }
            let reply = send(&ledger, token, &call).await;
            assert!(
                (200..300).contains(&reply.status),
                "{} {}: {} {}",
                call.method,
                call.path,
                reply.status,
                reply.body
            );
        }
    }
    ledger.assert_journal_sound().await;
}

async fn a_gateway_sync_books_known_subjects_and_answers_unknown_ones(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (alpha, beta) = (ledger.customer("alpha").await, ledger.customer("beta").await);
    ledger.grant(&alpha, grant_body("10.00", json!({}))).await;
    ledger.grant(&beta, grant_body("10.00", json!({}))).await;
    let usage =
        |subject: &str, amount: &str| subject_sync(subject, json!({"usage": usage_range(0, 3, amount, "credit_only")}));
    let body = json!({"node": "edge-1", "subjects": [
        usage("alpha-subject", "0.30"), usage("ghost", "5.00"), usage("beta-subject", "0.60"), usage("", "1.00"),
    ]});
    let reply = ledger.call_as(GATEWAY_TOKEN, Method::POST, "/v3/gateway/sync").json(&body).send().await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let answers = reply.body["subjects"].as_array().expect("subjects");
    let outcome: Vec<_> = answers.iter().map(|a| (a["status"].as_str(), a["usage"].as_str())).collect();
    assert_eq!(
        outcome,
        [
            (Some("ok"), Some("booked")),
            (Some("unknown_subject"), None),
            (Some("ok"), Some("booked")),
            (Some("rejected"), None)
        ],
        "{}",
        reply.body
    );
    assert_eq!(ledger.balance(&alpha, "").await.0, "9.70");
    assert_eq!(ledger.balance(&beta, "").await.0, "9.40");
    assert_eq!(ledger.row_counts().await["usage_marks"], 2, "only the good ranges are marked booked");
    ledger.assert_journal_sound().await;
}

async fn request_bodies_are_bounded_by_the_configured_limit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let limit = 4096;
    let ledger = Ledger::start_with(&db, limit).await;
    let c = ledger.customer("bounded").await;
    let before = ledger.snapshot(&c).await;
    let body_of = |size: usize| format!(r#"{{"name":"{}"}}"#, "x".repeat(size - r#"{"name":""}"#.len()));
    for (method, path, token) in [
        (Method::POST, "/v3/openmeter/customers".to_owned(), TOKEN),
        (Method::POST, format!("{}/credits/charges", customer_path(&c)), TOKEN),
        (Method::POST, "/v3/gateway/sync".to_owned(), GATEWAY_TOKEN),
    ] {
        let reply = ledger.call_as(token, method.clone(), &path).body(Some("application/json"), body_of(limit + 1));
        reply.send().await.assert_problem(413, None);
        let reply = ledger.call_as(token, method.clone(), &path).body(Some("application/json"), body_of(limit));
        assert_eq!(reply.send().await.status, 400, "{method} {path}: read at the limit, refused for what it says");
    }
    // An unauthenticated body is not read at all: 401, whatever its size.
    let reply =
        ledger.call_without_token(Method::POST, "/v3/gateway/sync").body(Some("application/json"), body_of(limit + 1));
    reply.send().await.assert_problem(401, None);
    assert_eq!(ledger.snapshot(&c).await, before, "nothing booked");
}

async fn lists_in_requests_are_bounded(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let keys = |n: usize| (0..n).map(|i| format!("subject-{i}")).collect::<Vec<_>>();
    let customer =
        |n: usize| json!({"name": "many", "key": format!("many-{n}"), "usage_attribution": {"subject_keys": keys(n)}});
    let reply = ledger.call(Method::POST, "/v3/openmeter/customers").json(&customer(101)).send().await;
    reply.assert_problem(400, Some("usage_attribution.subject_keys"));
    let c = ledger.call(Method::POST, "/v3/openmeter/customers").json(&customer(100)).send().await;
    assert_eq!(c.status, 201, "{}", c.body);
    let c = c.body["id"].as_str().expect("id").to_owned();
    let reply = ledger
        .call(Method::PUT, &customer_path(&c))
        .json(&json!({"name": "many", "usage_attribution": {"subject_keys": keys(101)}}));
    reply.send().await.assert_problem(400, Some("usage_attribution.subject_keys"));
    let features = |n: usize| (0..n).map(|i| format!("feature_{i}")).collect::<Vec<_>>();
    let grants = format!("{}/credits/grants", customer_path(&c));
    let reply =
        ledger.call(Method::POST, &grants).json(&grant_body("1", json!({"filters": {"features": features(101)}})));
    reply.send().await.assert_problem(400, Some("filters.features"));
    ledger.grant(&c, grant_body("1", json!({"filters": {"features": features(100)}}))).await;
    ledger.assert_journal_sound().await;
}

/// What the README gives the gateway scope, as `(method, OpenAPI path)`: "`POST
/// /v3/gateway/sync`, `POST /v3/openmeter/events` …, and read customers (`GET …/customers`, `GET
/// …/customers/{id}`) and balances (`GET …/credits/balance`)", and the per-call authorization
/// Envoy's `ext_authz` sends (any method).
const GATEWAY_SCOPE: &[(&str, &str)] = &[
    ("post", "/v3/gateway/sync"),
    ("post", "/v3/openmeter/events"),
    ("get", "/v3/openmeter/customers"),
    ("get", "/v3/openmeter/customers/{customerId}"),
    ("get", "/v3/openmeter/customers/{customerId}/credits/balance"),
    ("post", "/v3/gateway/authorize/{path}"),
];

/// Every operation the OpenAPI document lists ("lists every endpoint"), called with a gateway
/// token: those the README gives the gateway scope are served, every other one ("Anything else")
/// is a 403 problem that changes nothing — customers, credit, notification channels and rules.
async fn a_gateway_token_may_call_exactly_what_the_readme_lists(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let (c, g) = funded_customer(&ledger).await;
    let channels = "/v3/openmeter/notification/channels";
    let (status, channel) =
        ledger.post(channels, json!({"type": "webhook", "name": "ops", "url": "http://127.0.0.1:9/hook"})).await;
    assert_eq!(status, 201, "{channel}");
    let rules = "/v3/openmeter/notification/rules";
    let rule = json!({"type": "credits.balance.threshold", "name": "low", "channels": [channel["id"]],
        "currency": "USD", "thresholds": [{"type": "absolute", "value": "1"}]});
    let (status, rule) = ledger.post(rules, rule).await;
    assert_eq!(status, 201, "{rule}");
    let before = (ledger.snapshot(&c).await, notification_lists(&ledger).await);

    let openapi = ledger.call_without_token(Method::GET, "/v3/openapi.json").send().await;
    assert_eq!(openapi.status, 200, "{}", openapi.text);
    let paths = openapi.body["paths"].as_object().expect("paths").clone();
    let mut served = Vec::new();
    let mut refused = 0;
    for (template, operations) in &paths {
        let path = template
            .replace("{customerId}", &c)
            .replace("{creditGrantId}", &g)
            .replace("{channelId}", channel["id"].as_str().expect("channel id"))
            .replace("{ruleId}", rule["id"].as_str().expect("rule id"))
            .replace("{eventId}", support::UNKNOWN_ID)
            .replace("{path}", "api/things");
        for method in operations.as_object().expect("path item").keys() {
            let Ok(m) = Method::from_bytes(method.to_ascii_uppercase().as_bytes()) else { continue };
            if GATEWAY_SCOPE.contains(&(method.as_str(), template.as_str())) {
                served.push((method.clone(), template.clone()));
                continue;
            }
            let mut call = ledger.call_as(GATEWAY_TOKEN, m.clone(), &path);
            if m != Method::GET && m != Method::DELETE {
                call = call.json(&json!({}));
            }
            call.send().await.assert_problem(403, None);
            refused += 1;
        }
    }
    served.sort();
    let mut scope: Vec<(String, String)> =
        GATEWAY_SCOPE.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    scope.sort();
    assert_eq!(served, scope, "every operation of the gateway scope is in the OpenAPI document");
    assert!(refused >= 20, "the document lists the admin operations too ({refused} refused)");
    assert_eq!((ledger.snapshot(&c).await, notification_lists(&ledger).await), before, "nothing changed");

    // The gateway scope: served with the gateway token (authorizations with any method).
    let event = json!({"id": "e-1", "source": "gw", "specversion": "1.0", "type": "t", "subject": "scoped-subject"});
    let ok = [
        (Method::POST, "/v3/gateway/sync".to_owned(), Some(json!({"node": "n", "subjects": []}))),
        (Method::POST, "/v3/openmeter/events".to_owned(), Some(event)),
        (Method::GET, "/v3/openmeter/customers".to_owned(), None),
        (Method::GET, customer_path(&c), None),
        (Method::GET, format!("{}/credits/balance", customer_path(&c)), None),
    ];
    for (method, path, body) in ok {
        let mut call = ledger.call_as(GATEWAY_TOKEN, method.clone(), &path);
        if let Some(b) = &body {
            call = call.json(b);
        }
        let reply = call.send().await;
        assert!((200..300).contains(&reply.status), "{method} {path}: {} {}", reply.status, reply.text);
    }
    for (i, method) in [Method::GET, Method::POST, Method::PUT, Method::DELETE].into_iter().enumerate() {
        let reply = ledger
            .call_as(GATEWAY_TOKEN, method.clone(), "/v3/gateway/authorize/api/things")
            .header("x-credits-price", "0.50")
            .header("x-credits-currency", "USD")
            .header("x-consumer-username", "scoped-subject")
            .header("x-request-id", &format!("call-{i}"))
            .send()
            .await;
        assert_eq!(reply.status, 200, "{method}: {}", reply.text);
    }
    assert_eq!(ledger.balance(&c, "").await.0, "5.50", "10 granted, 2.50 charged, four calls of 0.50");
    ledger.assert_journal_sound().await;
}

/// The notification channels and rules, as an admin lists them.
async fn notification_lists(ledger: &Ledger) -> serde_json::Value {
    let (_, channels) = ledger.get("/v3/openmeter/notification/channels").await;
    let (_, rules) = ledger.get("/v3/openmeter/notification/rules").await;
    json!({"channels": channels, "rules": rules})
}

on_both_backends!(
    a_gateway_token_may_call_exactly_what_the_readme_lists,
    lists_in_requests_are_bounded,
    gateway_tokens_are_refused_outside_their_scope,
    admin_tokens_may_call_every_endpoint,
    a_gateway_sync_books_known_subjects_and_answers_unknown_ones,
    request_bodies_are_bounded_by_the_configured_limit,
);

fn ledger_command(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_credits-ledger"));
    command.args(args).env_remove("CREDITS_LEDGER_TOKEN").env_remove("CREDITS_LEDGER_GATEWAY_TOKEN");
    command
}

/// A `credits-ledger serve` process on a free port and a new SQLite file in `dir`, logging to
/// `dir/ledger.log`, with `configure`'s flags and environment; `(process, base URL, client)` once
/// it is healthy.
async fn served(dir: &support::tempdir::TempDir, configure: impl FnOnce(&mut Command)) -> (Child, String, Client) {
    let database = format!("sqlite://{}", dir.0.join("ledger.db").display());
    let port = free_port();
    let mut command = ledger_command(&["serve", "--listen", &format!("127.0.0.1:{port}"), "--database", &database]);
    configure(&mut command);
    let log = std::fs::File::create(dir.0.join("ledger.log")).expect("log file");
    let child = command.stdout(Stdio::null()).stderr(log).spawn().expect("spawn credits-ledger");
    let base = format!("http://127.0.0.1:{port}");
    let http = Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    wait_healthy(&http, &base).await;
    (child, base, http)
}

/// The real process, logging everything it can (`RUST_LOG=trace`), with tokens from its flags and
/// its environment: every scope works, and no token shows up in its log or its answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_process_checks_scopes_and_never_logs_a_token() {
    let dir = support::tempdir::TempDir::new();
    let (admin, admin_next) = ("adm-7f3a9c1e", "adm-next-0b2d4e6f");
    let (gateway, gateway_next) = ("gw-5e8d2a4b", "gw-next-9c1f3e7a");
    let (mut child, base, http) = served(&dir, |command| {
        command
            .arg(format!("--token={admin},{admin_next}"))
            .env("CREDITS_LEDGER_GATEWAY_TOKEN", format!("{gateway},{gateway_next}"))
            .env("RUST_LOG", "trace");
    })
    .await;

    let mut answers = String::new();
    let call = |method: Method, path: &str, token: &str| {
        let request = http.request(method, format!("{base}{path}")).bearer_auth(token);
        async move {
            let reply = request.json(&json!({"name": "n"})).send().await.expect("request");
            let status = reply.status().as_u16();
            (status, reply.text().await.unwrap_or_default())
        }
    };
    for (method, path, token, expected) in [
        (Method::GET, "/v3/openmeter/customers", admin, 200),
        (Method::GET, "/v3/openmeter/customers", admin_next, 200),
        (Method::GET, "/v3/openmeter/customers", gateway, 200),
        (Method::GET, "/v3/openmeter/customers", gateway_next, 200),
        (Method::POST, "/v3/openmeter/customers", gateway, 403),
        (Method::POST, "/v3/openmeter/customers", gateway_next, 403),
        (Method::GET, "/v3/openmeter/customers", "adm-7f3a9c1", 401),
        (Method::GET, "/v3/openmeter/customers", "gw-5e8d2a4bX", 401),
        (Method::POST, "/v3/gateway/sync", "not-a-token-3e1d", 401),
        (Method::POST, "/v3/gateway/sync", gateway, 400),
    ] {
        let (status, text) = call(method.clone(), path, token).await;
        assert_eq!(status, expected, "{method} {path}: {text}");
        answers.push_str(&text);
    }
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read_to_string(dir.0.join("ledger.log")).expect("log");
    assert!(logged.contains("credits-ledger serving"), "the log was captured:\n{logged}");
    for secret in [admin, admin_next, gateway, gateway_next, "adm-7f3a9c1", "not-a-token-3e1d"] {
        assert!(!logged.contains(secret), "{secret} appears in the log:\n{logged}");
        assert!(!answers.contains(secret), "{secret} appears in an answer:\n{answers}");
    }
}

/// `--insecure-no-auth` serves every endpoint to anyone (and says so in its log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_no_auth_serves_without_a_token() {
    let dir = support::tempdir::TempDir::new();
    let (mut child, base, http) = served(&dir, |command| {
        command.arg("--insecure-no-auth");
    })
    .await;
    let created = http.post(format!("{base}/v3/openmeter/customers")).json(&json!({"name": "n", "key": "k"})).send();
    let created = created.await.expect("request").status().as_u16();
    let listed = http.get(format!("{base}/v3/openmeter/customers")).send().await.expect("request");
    let listed = (listed.status().as_u16(), listed.text().await.unwrap_or_default());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(created, 201);
    assert_eq!(listed.0, 200, "{}", listed.1);
    assert!(listed.1.contains(r#""key":"k""#), "{}", listed.1);
    let logged = std::fs::read_to_string(dir.0.join("ledger.log")).expect("log");
    assert!(logged.contains("WITHOUT authentication"), "{logged}");
}

/// A setting the process cannot honour stops it at start with a message naming it: no token
/// where one is needed, unusable tokens, values out of their documented range.
#[test]
fn the_process_refuses_to_start_with_unusable_settings() {
    let dir = support::tempdir::TempDir::new();
    let database = format!("sqlite://{}", dir.0.join("ledger.db").display());
    // Taken: should a case get past its check by mistake, it fails to bind instead of serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    for (args, env, message) in [
        (vec![], None, "no admin token"),
        (vec!["--gateway-token", "gw-only-4d2c"], None, "no admin token"),
        (vec!["--token", "shared-8a1b", "--gateway-token", "gw-1,shared-8a1b"], None, "admin and as a gateway token"),
        (vec!["--token", "adm-1,"], None, "must not be empty"),
        (vec!["--token", "adm-1"], Some(("CREDITS_LEDGER_GATEWAY_TOKEN", "gw 2")), "whitespace"),
        (vec!["--token", "adm-1", "--max-body-bytes", "10"], None, "max-body-bytes"),
        (vec!["--insecure-no-auth", "--token", "adm-1"], None, "--insecure-no-auth"),
        (vec!["--insecure-no-auth"], Some(("CREDITS_LEDGER_GATEWAY_TOKEN", "gw-only-4d2c")), "--insecure-no-auth"),
        (vec!["--token", "adm-1", "--expiry-interval-ms", "9"], None, "--expiry-interval-ms"),
        (vec!["--token", "adm-1", "--expiry-interval-ms", "3600001"], None, "--expiry-interval-ms"),
        (vec!["--token", "adm-1", "--webhook-retry-ms", "86400001"], None, "--webhook-retry-ms"),
        (vec!["--token", "adm-1", "--webhook-max-retry-ms", "86400001"], None, "--webhook-max-retry-ms"),
        (vec!["--token", "adm-1", "--webhook-retry-ms", "0"], None, "--webhook-retry-ms"),
        (
            vec!["--token", "adm-1", "--webhook-retry-ms", "9000", "--webhook-max-retry-ms", "8000"],
            None,
            "--webhook-max-retry-ms",
        ),
        (vec!["--token", "adm-1", "--webhook-max-attempts", "0"], None, "--webhook-max-attempts"),
        (vec!["--token", "adm-1", "--webhook-max-attempts", "101"], None, "--webhook-max-attempts"),
        (vec!["--token", "adm-1", "--webhook-timeout-ms", "99"], None, "--webhook-timeout-ms"),
        (vec!["--token", "adm-1"], Some(("CREDITS_LEDGER_WEBHOOK_TIMEOUT_MS", "300001")), "--webhook-timeout-ms"),
        (vec!["--token", "adm-1", "--sync-group-ms", "9"], None, "--sync-group-ms"),
        (vec!["--token", "adm-1"], Some(("CREDITS_LEDGER_SYNC_GROUP_MS", "60001")), "--sync-group-ms"),
    ] {
        let mut command = ledger_command(&["serve", "--listen", &listen, "--database", &database]);
        command.args(&args);
        if let Some((name, value)) = env {
            command.env(name, value);
        }
        let output = command.output().expect("run credits-ledger");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} must not start");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        for secret in ["gw-only-4d2c", "shared-8a1b", "gw 2"] {
            assert!(!stderr.contains(secret), "{secret} appears in: {stderr}");
        }
    }
}
