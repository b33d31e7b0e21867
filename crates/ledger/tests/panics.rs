//! A panic in a request handler (a bug) answers 500 with a problem, books nothing, and the ledger
//! goes on serving — in-process here, and `main.rs` refuses to build the binary with
//! `panic = "abort"`, so the served process behaves the same.

mod support;

use std::time::Duration;

use axum::routing::post;
use axum::Router;
use ledger::api::{AppState, Auth};
use reqwest::Method;
use serde_json::json;
use support::{assert_problem, customer_path, grant_body, Backend, TestDb, TOKEN};

/// A handler with a bug: it starts a write, then panics before it commits.
async fn panicking_handler(axum::extract::State(state): axum::extract::State<AppState>) -> &'static str {
    let mut w = state.db.begin_write().await.expect("write");
    sqlx::query("UPDATE customers SET name = 'changed by a panicking handler'")
        .execute(&mut *w.tx)
        .await
        .expect("update");
    panic!("a bug in a handler");
}

async fn a_panicking_handler_answers_500_and_the_ledger_lives(backend: Backend) {
    let db = TestDb::new(backend).await;
    let auth = Auth::tokens(&[TOKEN], &[] as &[&str]).expect("tokens");
    let state = ledger::state(&db.url, auth).await.expect("state");
    let extra = Router::new().route("/v3/test/panic", post(panicking_handler));
    let app = ledger::api::router_with(state, extra);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
    let (status, body) = {
        let r = http
            .post(format!("{base}/v3/openmeter/customers"))
            .bearer_auth(TOKEN)
            .json(&json!({"name": "alive", "key": "alive"}))
            .send()
            .await
            .expect("create");
        (r.status().as_u16(), r.json::<serde_json::Value>().await.expect("json"))
    };
    assert_eq!(status, 201, "{body}");
    let customer = body["id"].as_str().expect("id").to_owned();
    for _ in 0..3 {
        let reply = http.post(format!("{base}/v3/test/panic")).bearer_auth(TOKEN).send().await.expect("an answer");
        let status = reply.status().as_u16();
        let content_type = reply.headers()["content-type"].to_str().expect("text").to_owned();
        let body: serde_json::Value = reply.json().await.expect("json");
        assert_problem(status, &content_type, &body, 500, None);
        // The next request is served, and the panicking handler's write was rolled back.
        let reply = http.get(format!("{base}{}", customer_path(&customer))).bearer_auth(TOKEN).send().await;
        let body: serde_json::Value = reply.expect("served").json().await.expect("json");
        assert_eq!(body["name"], "alive", "{body}");
    }
    let reply =
        http.request(Method::POST, format!("{base}{}/credits/grants", customer_path(&customer))).bearer_auth(TOKEN);
    assert_eq!(reply.json(&grant_body("1", json!({}))).send().await.expect("grant").status(), 201);
    server.abort();
}

on_both_backends!(a_panicking_handler_answers_500_and_the_ledger_lives);

/// The release profile the ledger binary is built with unwinds (a handler panic is caught);
/// only the Wasm target aborts.
#[test]
fn the_release_profile_unwinds_and_only_wasm_aborts() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let manifest = std::fs::read_to_string(format!("{root}/Cargo.toml")).expect("workspace manifest");
    let release: Vec<&str> =
        manifest.split("\n[").filter(|section| section.starts_with("profile.release")).flat_map(str::lines).collect();
    assert!(!release.is_empty(), "a release profile");
    assert!(!release.iter().any(|l| l.trim_start().starts_with("panic")), "release profile: {release:?}");
    let config = std::fs::read_to_string(format!("{root}/.cargo/config.toml")).expect(".cargo/config.toml");
    let wasm = config.split("\n[").find(|s| s.starts_with("target.wasm32-wasip1]")).expect("wasm32-wasip1 section");
    assert!(wasm.contains(r#"rustflags = ["-C", "panic=abort"]"#), "{wasm}");
}
