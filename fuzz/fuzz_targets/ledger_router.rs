#![no_main]
//! The ledger's whole HTTP router — tokens, body limit, every handler, the store — driven with
//! arbitrary requests against a real ledger on a temporary SQLite file. Fails on a panic (the
//! router answers one with a 500), on any 5xx but the documented 503 problem, on an error answer
//! that is not `application/problem+json`, and when the journal check (`credits-ledger check`)
//! finds a violation after a write was accepted.
//!
//! Input: byte 0 picks the token (admin, gateway, none, unknown); the rest is text, an HTTP/1
//! request without the version: `METHOD target` (any method; `{c}` in the target stands for a
//! customer of the ledger, `{g}` for one of its grants, `{s}` for that customer's subject), then
//! header lines `name: value` up to an empty line, then the body.

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::Router;
use ledger::api::{AppState, Auth};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const ADMIN: &str = "fuzz-admin-token";
const GATEWAY: &str = "fuzz-gateway-token";
/// Small, so that inputs of a few KiB reach the 413 path.
const MAX_BODY_BYTES: usize = 4096;
/// Writes before the ledger starts over on a fresh database (the journal check reads it all).
const WRITES_PER_DATABASE: u32 = 2000;

struct World {
    runtime: tokio::runtime::Runtime,
    ledger: std::sync::Mutex<Ledger>,
}

struct Ledger {
    state: AppState,
    router: Router,
    customer: String,
    grant: String,
    writes: u32,
    generation: u32,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let ledger = runtime.block_on(Ledger::start(0));
        World { runtime, ledger: std::sync::Mutex::new(ledger) }
    })
}

impl Ledger {
    /// A ledger on a fresh SQLite file with one customer (subject `fuzz-subject`) and one grant.
    async fn start(generation: u32) -> Ledger {
        let dir = std::env::temp_dir().join(format!("ledger-router-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join(format!("ledger-{generation}.db"));
        let _ = std::fs::remove_file(&file);
        if let Some(previous) = generation.checked_sub(1) {
            for suffix in ["db", "db-shm", "db-wal"] {
                let _ = std::fs::remove_file(dir.join(format!("ledger-{previous}.{suffix}")));
            }
        }
        let auth = Auth::tokens(&[ADMIN], &[GATEWAY]).expect("tokens");
        let mut state = ledger::state(&format!("sqlite://{}", file.display()), auth).await.expect("ledger state");
        state.max_body_bytes = MAX_BODY_BYTES;
        let router = ledger::api::router(state.clone());
        let mut ledger = Ledger { state, router, customer: String::new(), grant: String::new(), writes: 0, generation };
        let body = r#"{"name":"fuzz","key":"fuzz","usage_attribution":{"subject_keys":["fuzz-subject"]}}"#;
        ledger.customer = ledger.created(Method::POST, "/v3/openmeter/customers", body).await;
        let grant = r#"{"name":"g","funding_method":"none","currency":"USD","amount":"100","expires_after":"P1D"}"#;
        let path = format!("/v3/openmeter/customers/{}/credits/grants", ledger.customer);
        ledger.grant = ledger.created(Method::POST, &path, grant).await;
        ledger
    }

    /// The id of what a seeding request created.
    async fn created(&self, method: Method, path: &str, body: &str) -> String {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {ADMIN}"))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .expect("seed request");
        let response = self.router.clone().oneshot(req).await.expect("infallible");
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
        let value: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        value["id"].as_str().expect("created").to_owned()
    }
}

/// The request an input describes, if it is one (a path that is not a URI is skipped).
fn request(data: &[u8], ledger: &Ledger) -> Option<Request<Body>> {
    let (&token, rest) = data.split_first()?;
    let text = String::from_utf8_lossy(rest);
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let (method, target) = lines.next()?.split_once(' ')?;
    let target = target.replace("{c}", &ledger.customer).replace("{g}", &ledger.grant).replace("{s}", "fuzz-subject");
    let mut builder = Request::builder().method(Method::from_bytes(method.as_bytes()).ok()?).uri(target);
    match token % 4 {
        0 => builder = builder.header(header::AUTHORIZATION, format!("Bearer {ADMIN}")),
        1 => builder = builder.header(header::AUTHORIZATION, format!("Bearer {GATEWAY}")),
        2 => {}
        _ => builder = builder.header(header::AUTHORIZATION, "Bearer not-a-token"),
    }
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.trim()), HeaderValue::try_from(value.trim())) {
            builder = builder.header(name, value);
        }
    }
    builder.body(Body::from(body.to_owned())).ok()
}

/// What the router answered, checked against the promises (a HEAD answer has no body).
async fn check_answer(response: axum::response::Response, head: bool) -> (StatusCode, String) {
    let status = response.status();
    let content_type =
        response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if (status.is_client_error() || status.is_server_error()) && !head {
        assert_eq!(content_type, "application/problem+json", "{status} without a problem: {text}");
        let problem: serde_json::Value = serde_json::from_str(&text).expect("a problem is JSON");
        assert_eq!(problem["status"], status.as_u16(), "{text}");
    }
    // The only 5xx the ledger documents: its database is unreachable (503).
    assert!(!status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE, "{status}: {text}");
    (status, text)
}

fuzz_target!(|data: &[u8]| {
    let world = world();
    let mut ledger = world.ledger.lock().unwrap_or_else(|e| e.into_inner());
    let Some(req) = request(data, &ledger) else { return };
    let head = req.method() == Method::HEAD;
    let write = req.method() != Method::GET && !head;
    world.runtime.block_on(async {
        let response = ledger.router.clone().oneshot(req).await.expect("infallible");
        let (status, _) = check_answer(response, head).await;
        if write && status.is_success() {
            let problems = ledger::check::run(&ledger.state.db).await.expect("the check runs");
            assert!(problems.is_empty(), "journal check after an accepted write: {problems:?}");
            ledger.writes = ledger.writes.saturating_add(1);
        }
        if ledger.writes >= WRITES_PER_DATABASE {
            let next = ledger.generation.saturating_add(1);
            *ledger = Ledger::start(next).await;
        }
    });
});
