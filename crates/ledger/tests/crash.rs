//! kill -9 under load loses no acknowledged write and leaves a journal that `check` accepts.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::{free_port, wait_healthy, Backend, TestDb, TOKEN};
use tokio::sync::Mutex;

fn spawn_ledger(db: &str, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_credits-ledger"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--database", db, "--token", TOKEN])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn credits-ledger")
}

async fn kill_nine_under_load(backend: Backend) {
    let db = TestDb::new(backend).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    let mut child = spawn_ledger(&db.url, port);
    wait_healthy(&http, &base).await;

    let customer: serde_json::Value = http
        .post(format!("{base}/v3/openmeter/customers"))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "crash", "key": "crash"}))
        .send()
        .await
        .expect("create customer")
        .json()
        .await
        .expect("json");
    let customer = customer["id"].as_str().expect("id").to_owned();
    let grants = format!("{base}/v3/openmeter/customers/{customer}/credits/grants");
    let grant = json!({"name": "big", "funding_method": "none", "currency": "USD", "amount": "100000"});
    assert_eq!(http.post(&grants).bearer_auth(TOKEN).json(&grant).send().await.expect("grant").status(), 201);

    // Eight clients charge until the ledger dies; remember what it acknowledged.
    let acknowledged: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let charges = format!("{base}/v3/openmeter/customers/{customer}/credits/charges");
    let mut clients = Vec::new();
    for c in 0..8 {
        let (http, charges, acknowledged) = (http.clone(), charges.clone(), acknowledged.clone());
        clients.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("c{c}-{i}");
                let body = json!({"amount": "0.01", "currency": "USD", "settlement_mode": "credit_only", "key": key});
                match http.post(&charges).bearer_auth(TOKEN).json(&body).send().await {
                    Ok(r) if r.status() == 201 => {
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        acknowledged.lock().await.push((key, v["id"].as_str().unwrap_or_default().to_owned()));
                    }
                    _ => break,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    child.kill().expect("kill -9"); // SIGKILL: no shutdown hooks run
    let _ = child.wait();
    for c in clients {
        let _ = c.await;
    }
    let acknowledged = acknowledged.lock().await.clone();
    assert!(acknowledged.len() > 10, "the load produced acknowledged charges ({})", acknowledged.len());

    // Restart on the same database: every acknowledged charge is there, exactly once.
    let mut child = spawn_ledger(&db.url, port);
    wait_healthy(&http, &base).await;
    for (key, id) in &acknowledged {
        let body = json!({"amount": "0.01", "currency": "USD", "settlement_mode": "credit_only", "key": key});
        let replay = http.post(&charges).bearer_auth(TOKEN).json(&body).send().await.expect("replay");
        assert_eq!(replay.status(), 201);
        let v: serde_json::Value = replay.json().await.expect("json");
        assert_eq!(v["id"].as_str(), Some(id.as_str()), "charge {key} survived with its original answer");
    }
    let balance: serde_json::Value = http
        .get(format!("{base}/v3/openmeter/customers/{customer}/credits/balance"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("balance")
        .json()
        .await
        .expect("json");
    let settled: rust_decimal::Decimal =
        balance["balances"][0]["settled"].as_str().expect("settled").parse().expect("decimal");
    let consumed = rust_decimal::Decimal::from(100000) - settled;
    // Charges committed just before the kill may not have been acknowledged; none is lost.
    assert!(consumed >= rust_decimal::Decimal::new(acknowledged.len() as i64, 2), "consumed {consumed} < acknowledged");
    child.kill().expect("stop");
    let _ = child.wait();

    let check = Command::new(env!("CARGO_BIN_EXE_credits-ledger"))
        .args(["check", "--database", &db.url])
        .output()
        .expect("check");
    assert!(check.status.success(), "check failed:\n{}", String::from_utf8_lossy(&check.stdout));
}

on_both_backends!(kill_nine_under_load);
