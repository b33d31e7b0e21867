//! A fault-injecting HTTP/1.1 proxy between Envoy's ledger cluster and the ledger. Each request is
//! forwarded (so the ledger books what it is sent) and the ledger's answer is then passed on,
//! delayed or corrupted, as the current [`Fault`] says. A ledger that cannot be reached closes the
//! gateway's connection, as a dead host would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answers pass unchanged.
    None,
    /// The ledger books the request; its answer arrives this much later.
    Delay(Duration),
    /// `200` with an HTML body.
    NotJson,
    /// `200` with the first half of the ledger's JSON.
    Truncated,
    /// `200` with the ledger's JSON answer, every subject renamed.
    WrongSubjects,
}

pub struct FaultProxy {
    pub port: u16,
    fault: Arc<Mutex<Fault>>,
    /// Answers delayed or corrupted so far.
    faulted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(ledger_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (fault, faulted) = (Arc::new(Mutex::new(Fault::None)), Arc::new(AtomicU64::new(0)));
        let (shared, count) = (fault.clone(), faulted.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, ledger_port, shared.clone(), count.clone()));
            }
        });
        FaultProxy { port, fault, faulted, task }
    }

    pub fn set(&self, fault: Fault) {
        *self.fault.lock().expect("fault") = fault;
    }

    /// How many answers were delayed or corrupted so far.
    pub fn faulted(&self) -> u64 {
        self.faulted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/1.1 message: start line and headers (without framing headers), and the whole body.
struct Message {
    head: Vec<String>,
    body: Vec<u8>,
}

impl Message {
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for line in &self.head {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("content-length: {}\r\n\r\n", self.body.len()).as_bytes());
        out.extend_from_slice(&self.body);
        out
    }
}

/// Reads one message; `None` when the peer closed or sent something this proxy cannot frame.
async fn read_message<R: AsyncBufRead + Unpin>(reader: &mut R) -> Option<Message> {
    let mut head = Vec::new();
    let (mut length, mut chunked) = (0usize, false);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let line = line.trim_end_matches(['\r', '\n']).to_owned();
        if line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().ok()?;
        } else if lower.starts_with("transfer-encoding:") {
            chunked = lower.contains("chunked");
        } else {
            head.push(line);
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).await.ok()?;
            let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2]; // the chunk and its CRLF
            reader.read_exact(&mut chunk).await.ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length, 0);
        reader.read_exact(&mut body).await.ok()?;
    }
    Some(Message { head, body })
}

async fn relay(client: TcpStream, ledger_port: u16, fault: Arc<Mutex<Fault>>, faulted: Arc<AtomicU64>) {
    let mut client = BufReader::new(client);
    let Ok(ledger) = TcpStream::connect(("127.0.0.1", ledger_port)).await else {
        return; // the ledger is down: the gateway's connection is closed
    };
    let mut ledger = BufReader::new(ledger);
    while let Some(request) = read_message(&mut client).await {
        if ledger.get_mut().write_all(&request.bytes()).await.is_err() {
            return;
        }
        let Some(mut answer) = read_message(&mut ledger).await else { return };
        let current = *fault.lock().expect("fault");
        if current != Fault::None {
            faulted.fetch_add(1, Ordering::SeqCst);
        }
        match current {
            Fault::None => {}
            Fault::Delay(delay) => tokio::time::sleep(delay).await,
            Fault::NotJson => answer = ok(b"<html><body>502 Bad Gateway</body></html>".to_vec()),
            Fault::Truncated => answer = ok(answer.body[..answer.body.len() / 2].to_vec()),
            Fault::WrongSubjects => {
                let mut json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
                for s in json["subjects"].as_array_mut().into_iter().flatten() {
                    s["subject"] = serde_json::json!(format!("{}-impostor", s["subject"].as_str().unwrap_or("")));
                }
                answer = ok(json.to_string().into_bytes());
            }
        }
        if client.get_mut().write_all(&answer.bytes()).await.is_err() {
            return;
        }
    }
}

fn ok(body: Vec<u8>) -> Message {
    Message { head: vec!["HTTP/1.1 200 OK".to_owned(), "content-type: application/json".to_owned()], body }
}
