//! Just enough of the W3C WebDriver protocol to drive Debian's headless Chromium through
//! ChromeDriver from a test: sessions, navigation, elements, scripts, alerts, the browser log.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::tempdir::TempDir;

/// The key W3C WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long a wait for the page may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// Paths of Chromium and its driver: `CHROMIUM` / `CHROMEDRIVER`, else Debian's.
pub fn browser_paths() -> (String, String) {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let driver = std::env::var("CHROMEDRIVER").unwrap_or_else(|_| "/usr/bin/chromedriver".to_owned());
    (chromium, driver)
}

/// A ChromeDriver process, stopped (by its pid) on drop.
pub struct Driver {
    child: Child,
    pub base: String,
    http: reqwest::Client,
    _profile: TempDir,
    chromium: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    pub async fn start(chromium: &str, driver: &str) -> Driver {
        let port = super::free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {driver}: {e}"));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        while started.elapsed() < WAIT {
            let ready = http.get(format!("{base}/status")).send().await.ok();
            if let Some(r) = ready {
                if r.json::<Value>().await.is_ok_and(|v| v["value"]["ready"] == true) {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Driver { child, base, http, _profile: TempDir::new(), chromium: chromium.to_owned() }
    }

    /// A new headless browser with a fresh profile and the flags that work on a closed network.
    pub async fn session(&self) -> Session {
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1600",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", self._profile.0.display())])
        .collect::<Vec<_>>();
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": self.chromium, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let reply =
            call(&self.http, reqwest::Method::POST, &format!("{}/session", self.base), Some(capabilities)).await;
        let id = reply["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {reply}")).to_owned();
        Session { http: self.http.clone(), base: format!("{}/session/{id}", self.base) }
    }
}

/// One WebDriver request: its status and its whole JSON answer.
async fn send(
    http: &reqwest::Client,
    method: &reqwest::Method,
    url: &str,
    body: Option<&Value>,
) -> (reqwest::StatusCode, Value) {
    let mut request = http.request(method.clone(), url);
    if let Some(b) = body {
        request = request.json(b);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn call(http: &reqwest::Client, method: reqwest::Method, url: &str, body: Option<Value>) -> Value {
    let (status, value) = send(http, &method, url, body.as_ref()).await;
    assert!(status.is_success(), "{method} {url}: {status} {value}");
    value["value"].clone()
}

/// One browser session.
pub struct Session {
    http: reqwest::Client,
    base: String,
}

impl Session {
    async fn post(&self, path: &str, body: Value) -> Value {
        call(&self.http, reqwest::Method::POST, &format!("{}{path}", self.base), Some(body)).await
    }

    async fn get(&self, path: &str) -> Value {
        call(&self.http, reqwest::Method::GET, &format!("{}{path}", self.base), None).await
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page and returns its value.
    pub async fn script(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": args})).await
    }

    /// The element `css` selects, waiting for it to exist and be shown.
    pub async fn find(&self, css: &str) -> String {
        let visible = "const e = document.querySelector(arguments[0]); return !!e && e.getClientRects().length > 0;";
        self.wait_for(&format!("{css} shown"), visible, json!([css])).await;
        let found = self.post("/element", json!({"using": "css selector", "value": css})).await;
        found[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {found}")).to_owned()
    }

    /// `method` on the element `css` selects (`action`: `/click`, `/text`, …). The console
    /// re-renders after each answer it gets: an element replaced between finding it and acting on
    /// it ("stale element reference") is found again, as a user's click lands on the new one.
    async fn on_element(&self, css: &str, method: reqwest::Method, action: &str, body: Option<Value>) -> Value {
        let started = Instant::now();
        loop {
            let element = self.find(css).await;
            let url = format!("{}/element/{element}{action}", self.base);
            let (status, value) = send(&self.http, &method, &url, body.as_ref()).await;
            if status.is_success() {
                return value["value"].clone();
            }
            let stale = value["value"]["error"] == "stale element reference";
            assert!(stale && started.elapsed() < WAIT, "{method} {url}: {status} {value}");
        }
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        self.on_element(css, reqwest::Method::POST, "/clear", Some(json!({}))).await;
        self.on_element(css, reqwest::Method::POST, "/value", Some(json!({"text": text}))).await;
    }

    pub async fn click(&self, css: &str) {
        self.on_element(css, reqwest::Method::POST, "/click", Some(json!({}))).await;
    }

    pub async fn text(&self, css: &str) -> String {
        let text = self.on_element(css, reqwest::Method::GET, "/text", None).await;
        text.as_str().unwrap_or("").to_owned()
    }

    /// Waits until `script` returns true; fails with `what` and the page's status line if not.
    pub async fn wait_for(&self, what: &str, script: &str, args: Value) {
        let started = Instant::now();
        while started.elapsed() < WAIT {
            if self.script(script, args.clone()).await == Value::Bool(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let status = self.script("return document.querySelector('#status')?.textContent ?? ''", json!([])).await;
        panic!("waited {WAIT:?} for {what}; the console says {status}");
    }

    /// Waits until the text of the element `css` selects is `expected`.
    pub async fn wait_text(&self, css: &str, expected: &str) {
        let script =
            "const e = document.querySelector(arguments[0]); return !!e && e.textContent.trim() === arguments[1];";
        self.wait_for(&format!("{css} to read {expected:?}"), script, json!([css, expected])).await;
    }

    pub async fn accept_alert(&self) {
        let started = Instant::now();
        loop {
            let reply = self.http.post(format!("{}/alert/accept", self.base)).json(&json!({})).send().await;
            if reply.is_ok_and(|r| r.status().is_success()) || started.elapsed() > WAIT {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The browser console's entries since the last call (ChromeDriver's log endpoint).
    pub async fn browser_log(&self) -> Vec<Value> {
        self.post("/se/log", json!({"type": "browser"})).await.as_array().cloned().unwrap_or_default()
    }

    pub async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
        let png = self.get("/screenshot").await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap_or("")).expect("png");
        std::fs::write(path, bytes).expect("screenshot");
    }

    pub async fn close(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}
