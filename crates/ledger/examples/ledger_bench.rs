//! Charges per second through `POST …/credits/charges` against a real `credits-ledger` process.
//!
//! cargo run --release -p ledger --example charge_bench -- \
//!     --ledger target/release/credits-ledger --database sqlite:///tmp/bench.db --customers 100 --clients 16 --seconds 5
//!
//! Prints one JSON object with the throughput and latency percentiles.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

const TOKEN: &str = "bench-token";

struct Args {
    ledger: String,
    database: String,
    customers: usize,
    clients: usize,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args {
        ledger: "target/release/credits-ledger".into(),
        database: String::new(),
        customers: 1,
        clients: 1,
        seconds: 5,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_default();
        match flag.as_str() {
            "--ledger" => a.ledger = value,
            "--database" => a.database = value,
            "--customers" => a.customers = value.parse().unwrap_or(1),
            "--clients" => a.clients = value.parse().unwrap_or(1),
            "--seconds" => a.seconds = value.parse().unwrap_or(5),
            other => panic!("unknown flag {other}"),
        }
    }
    assert!(!a.database.is_empty(), "--database is required");
    a
}

#[tokio::main]
async fn main() {
    let a = args();
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|x| x.port()).expect("port");
    let mut ledger = Command::new(&a.ledger)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database", &a.database, "--token", TOKEN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start credits-ledger");
    let base = format!("http://127.0.0.1:{port}/v3/openmeter");
    let http = reqwest::Client::builder().pool_max_idle_per_host(a.clients * 2).build().expect("client");
    for _ in 0..200 {
        if http.get(format!("http://127.0.0.1:{port}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let mut customers = Vec::new();
    for i in 0..a.customers {
        let c: serde_json::Value = http
            .post(format!("{base}/customers"))
            .bearer_auth(TOKEN)
            .json(&json!({"name": format!("bench {i}"), "key": format!("bench-{run}-{i}")}))
            .send()
            .await
            .expect("customer")
            .json()
            .await
            .expect("json");
        let id = c["id"].as_str().expect("id").to_owned();
        http.post(format!("{base}/customers/{id}/credits/grants"))
            .bearer_auth(TOKEN)
            .json(&json!({"name": "bench", "funding_method": "none", "currency": "USD", "amount": "1000000"}))
            .send()
            .await
            .expect("grant");
        customers.push(id);
    }
    let customers = Arc::new(customers);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..a.clients {
        let (http, base, customers, done, failed) =
            (http.clone(), base.clone(), customers.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0usize;
            while Instant::now() < deadline {
                let customer = &customers[(client + n * 7) % customers.len()];
                let body = json!({"amount": "0.01", "currency": "USD", "settlement_mode": "credit_only", "key": format!("c{client}-{n}")});
                let t = Instant::now();
                let ok = http.post(format!("{base}/customers/{customer}/credits/charges")).bearer_auth(TOKEN).json(&body).send().await.is_ok_and(|r| r.status() == 201);
                latencies.push(t.elapsed());
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            latencies
        }));
    }
    let mut latencies: Vec<Duration> = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("client"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let pct =
        |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p) as usize).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
    let backend = if a.database.starts_with("sqlite") { "sqlite" } else { "postgres" };
    let result = json!({
        "backend": backend,
        "customers": a.customers,
        "clients": a.clients,
        "seconds": elapsed,
        "charges": done.load(Ordering::Relaxed),
        "failed": failed.load(Ordering::Relaxed),
        "charges_per_second": (done.load(Ordering::Relaxed) as f64 / elapsed).round(),
        "p50_ms": (pct(0.50) * 100.0).round() / 100.0,
        "p99_ms": (pct(0.99) * 100.0).round() / 100.0,
    });
    println!("{result}");
    let _ = ledger.kill();
    let _ = ledger.wait();
}
