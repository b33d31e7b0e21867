//! Oversized request bodies, sent as real clients send them over real sockets: every client
//! reads the 413 problem (the ledger drains what it refuses before it closes), a declared length
//! far beyond the limit is refused at once, and a client waiting for `100 Continue` is answered
//! without sending its body.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Backend, Ledger, TestDb, GATEWAY_TOKEN, TOKEN};

const FIVE_MB: usize = 5_000_000;

/// Sends `head` then `body` on a fresh connection, like Python's urllib: every byte is written
/// before the answer is read. Returns the raw answer, or the error that cut it off.
fn exchange(base: &str, head: &str, body: &[u8]) -> Result<String, String> {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
    stream.write_all(head.as_bytes()).map_err(|e| format!("write head: {e}"))?;
    stream.write_all(body).map_err(|e| format!("write body: {e}"))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| format!("read: {e}"))?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn post_head(path: &str, token: &str, framing: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: ledger\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\n{framing}\r\n"
    )
}

/// Asserts a 413 problem that closes the connection.
fn assert_413(answer: &str) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no answer: {answer:?}"));
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 413"), "{head}");
    assert!(head.contains("content-type: application/problem+json"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let problem: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(problem["status"], json!(413), "{problem}");
}

/// Chunked transfer encoding of `body` in 64 KiB chunks.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 1000);
    for chunk in body.chunks(64 * 1024) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

async fn every_client_reads_the_413_of_an_oversized_body(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let base = ledger.base.clone();
    let before = ledger.row_counts().await;
    let outcomes = tokio::task::spawn_blocking(move || {
        let body = vec![b'x'; FIVE_MB];
        let mut outcomes = Vec::new();
        for i in 0..10 {
            let (path, token) =
                if i % 2 == 0 { ("/v3/openmeter/customers", TOKEN) } else { ("/v3/gateway/sync", GATEWAY_TOKEN) };
            let head = post_head(path, token, &format!("Content-Length: {FIVE_MB}\r\n"));
            outcomes.push(exchange(&base, &head, &body));
        }
        for _ in 0..3 {
            let head = post_head("/v3/gateway/sync", GATEWAY_TOKEN, "Transfer-Encoding: chunked\r\n");
            outcomes.push(exchange(&base, &head, &chunked(&body)));
        }
        outcomes
    })
    .await
    .expect("client thread");
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Ok(answer) => assert_413(answer),
            Err(e) => panic!("request {i}: the client got no answer: {e}"),
        }
    }
    assert_eq!(ledger.row_counts().await, before, "nothing stored");
}

async fn far_larger_bodies_and_waiting_clients_are_refused_at_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let ledger = Ledger::start(&db).await;
    let base = ledger.base.clone();
    tokio::task::spawn_blocking(move || {
        // A gigabyte announced, nothing sent: the answer comes without waiting for the body.
        let started = Instant::now();
        let head = post_head("/v3/openmeter/customers", TOKEN, "Content-Length: 1000000000\r\n");
        assert_413(&exchange(&base, &head, b"").expect("an answer"));
        // A client that waits for 100 Continue before its 5 MB gets the 413 instead.
        let head = post_head("/v3/gateway/sync", GATEWAY_TOKEN, "Content-Length: 5000000\r\nExpect: 100-continue\r\n");
        let answer = exchange(&base, &head, b"").expect("an answer");
        assert!(!answer.contains("100 Continue"), "{answer}");
        assert_413(&answer);
        assert!(started.elapsed() < Duration::from_secs(5), "answered at once: {:?}", started.elapsed());
    })
    .await
    .expect("client thread");
    // A body within the limit is still read and served.
    let (status, body) = ledger.post("/v3/openmeter/customers", json!({"name": "n", "key": "k"})).await;
    assert_eq!(status, 201, "{body}");
}

on_both_backends!(
    every_client_reads_the_413_of_an_oversized_body,
    far_larger_bodies_and_waiting_clients_are_refused_at_once,
);
