//! Test support: a real ledger (in-process HTTP server) on a fresh SQLite file or a fresh
//! PostgreSQL database that is dropped afterwards.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use ledger::api::{AppState, Auth};
use serde_json::{json, Value};

pub const TOKEN: &str = "test-token";

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
        let state = ledger::state(&db.url, Auth::Token(Arc::new(TOKEN.to_owned()))).await.expect("ledger state");
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
        let mut req = self.http.request(method, self.url(path)).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
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
