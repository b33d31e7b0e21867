#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking
//! Kong's real engine: how early a dispatch that the engine fails at its timeout can look to a
//! filter on the clock it reads. ngx_wasm_module times the dispatch on nginx's monotonic
//! millisecond clock while `get_current_time` reads the wall clock, each cut to the millisecond at
//! its own phase (read in the source), so the harnesses time dispatches out as early as
//! `Rules::timeout_early_ms` says (`Dispatched::timed_out_at_ms`, `Kong::time_out`). This test
//! measures the engine against that: `tests/probes/clock` dispatches to an address that accepts
//! and never answers, and reports the elapsed milliseconds by its clock. Runs only with
//! `E2E_GATEWAY=nginx` (`scripts/kong-engine-test`); under Envoy, where no read is cut short to
//! its call's wait, it says so and passes.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use prepaid_credits::engine::Rules;
use support::{free_port, nginx_fatal_lines, repo, upstream, Engine, TempDir};

const TIMEOUT_MS: u64 = 5;
const DISPATCHES: usize = 400;

/// One nginx process (no master) with the probe in front of `upstream_port`, dispatching to
/// `silent_port`.
fn probe_conf(prefix: &std::path::Path, port: u16, upstream_port: u16, silent_port: u16) -> String {
    let p = prefix.display();
    let probe = repo().join("target/wasm32-wasip1/release/clock_probe.wasm");
    assert!(probe.exists(), "build it: cargo build --release --target wasm32-wasip1 -p clock-probe");
    format!(
        r#"daemon off;
master_process off;
pid {p}/nginx.pid;
error_log {p}/error.log info;
events {{ worker_connections 256; }}
wasm {{ module clock_probe {probe}; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    server {{
        listen 127.0.0.1:{port};
        location = /__ready {{ return 200 "ready"; }}
        location / {{
            proxy_wasm_request_headers_in_access on;
            proxy_wasm clock_probe '127.0.0.1:{silent_port} {TIMEOUT_MS}';
            proxy_pass http://127.0.0.1:{upstream_port};
        }}
    }}
}}
"#,
        probe = probe.display()
    )
}

#[tokio::test]
async fn a_dispatch_the_engine_times_out_looks_no_earlier_to_the_filter_than_the_harnesses_allow() {
    let Engine::Nginx(bin) = Engine::from_env() else {
        eprintln!("skipped: the clocks of Kong's engine (run with E2E_GATEWAY=nginx)");
        return;
    };
    // Accepts and never answers: every dispatch fails at its read timeout.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let (upstream_port, _upstream) = upstream().await;
    let dir = TempDir::new("kong-clock");
    let port = free_port();
    let conf = dir.0.join("nginx.conf");
    std::fs::write(&conf, probe_conf(&dir.0, port, upstream_port, silent_port)).unwrap();
    let mut nginx = Command::new(bin)
        .args(["-p", &dir.0.display().to_string(), "-c", &conf.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..200 {
        ready = http.get(format!("http://127.0.0.1:{port}/__ready")).send().await.is_ok_and(|r| r.status() == 200);
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for _ in 0..DISPATCHES.min(if ready { usize::MAX } else { 0 }) {
        let answer = http.get(format!("http://127.0.0.1:{port}/")).send().await.unwrap();
        let header = |name: &str| answer.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert_eq!((answer.status().as_u16(), header("x-probe-dispatch-status")), (200, "timeout".to_owned()));
        *seen.entry(header("x-probe-elapsed-ms").parse().unwrap()).or_default() += 1;
    }
    nginx.kill().unwrap();
    nginx.wait().unwrap();
    let log = std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default();
    assert!(ready, "nginx did not become ready; log:\n{log}");
    assert!(nginx_fatal_lines(&log).is_empty(), "{:?}", nginx_fatal_lines(&log));
    eprintln!("a {TIMEOUT_MS}-ms timeout by the filter's clock, ms: dispatches {seen:?}");
    let shortest = *seen.keys().next().unwrap();
    assert!(
        shortest + Rules::Nginx.timeout_early_ms() >= TIMEOUT_MS,
        "a dispatch timed out after {shortest} ms by the filter's clock: earlier than the harnesses allow ({seen:?})"
    );
}
