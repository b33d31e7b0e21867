//! A webhook receiver for the notification tests: a real HTTP server that verifies every
//! delivery's Standard Webhooks signature on its own (HMAC-SHA256 over "{id}.{timestamp}.{body}")
//! and answers as its script says.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The signing secret the tests give their channels, and its key bytes.
pub const SECRET: &str = "whsec_c2VjcmV0LWtleS1vZi10aGUtdGVzdC1yZWNlaXZlci0zMmI=";

/// How the receiver answers one delivery.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    /// This status; a 3xx points back at the receiver itself (`Location: /hook`).
    Status(u16),
    /// Waits this long, then answers 200 (a slow receiver).
    Slow(Duration),
}

#[derive(Clone, Debug)]
pub struct Delivery {
    pub id: String,
    pub timestamp: i64,
    pub signature_valid: bool,
    pub headers: HeaderMap,
    pub body: Value,
    pub at: Instant,
    pub answered: u16,
}

#[derive(Clone, Default)]
struct Shared {
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    /// Answers in order; once empty, 200.
    script: Arc<Mutex<VecDeque<Answer>>>,
    fail_first_of_each: Arc<Mutex<bool>>,
}

pub struct Receiver {
    pub url: String,
    shared: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn verify(headers: &HeaderMap, body: &[u8]) -> (String, i64, bool) {
    let get = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (id, timestamp, signature) = (get("webhook-id"), get("webhook-timestamp"), get("webhook-signature"));
    let key = STANDARD.decode(SECRET.trim_start_matches("whsec_")).unwrap_or_default();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("hmac key");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    // The header may list several signatures separated by spaces.
    let valid = signature.split(' ').any(|s| s == expected);
    (id, timestamp.parse().unwrap_or(0), valid)
}

async fn receive(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> (StatusCode, HeaderMap) {
    let (id, timestamp, signature_valid) = verify(&headers, &body);
    let answer = {
        let first_time = !shared.deliveries.lock().expect("lock").iter().any(|d| d.id == id);
        if first_time && *shared.fail_first_of_each.lock().expect("lock") {
            Answer::Status(503)
        } else {
            shared.script.lock().expect("lock").pop_front().unwrap_or(Answer::Status(200))
        }
    };
    let status = match answer {
        Answer::Status(s) => s,
        Answer::Slow(d) => {
            tokio::time::sleep(d).await;
            200
        }
    };
    let delivery = Delivery {
        id,
        timestamp,
        signature_valid,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: Instant::now(),
        answered: status,
    };
    shared.deliveries.lock().expect("lock").push(delivery);
    let mut answer_headers = HeaderMap::new();
    if (300..400).contains(&status) {
        answer_headers.insert(axum::http::header::LOCATION, axum::http::HeaderValue::from_static("/hook"));
    }
    (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), answer_headers)
}

impl Receiver {
    pub async fn start() -> Receiver {
        let shared = Shared::default();
        let app = Router::new().route("/hook", post(receive)).with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { url, shared, server }
    }

    /// The next answers, in order (then 200).
    pub fn script(&self, answers: &[Answer]) {
        self.shared.script.lock().expect("lock").extend(answers.iter().copied());
    }

    /// Every event's first delivery is answered 503.
    pub fn fail_first_of_each(&self) {
        *self.shared.fail_first_of_each.lock().expect("lock") = true;
    }

    /// Every delivery received (answered or not yet), in arrival order of their answers.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.shared.deliveries.lock().expect("lock").clone()
    }

    /// Waits until `n` deliveries arrived (or panics after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Delivery> {
        let started = Instant::now();
        loop {
            let got = self.deliveries();
            if got.len() >= n {
                return got;
            }
            assert!(started.elapsed() < timeout, "waited {timeout:?} for {n} deliveries, got {}: {got:?}", got.len());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
