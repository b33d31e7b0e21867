//! An upstream that answers like an LLM API (JSON, or server-sent events with `"stream": true`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use futures_util::stream;
use serde_json::{json, Value};

/// An LLM-like API (see [`Llm`]): its port and the number of requests it answered.
pub async fn llm() -> (u16, Arc<AtomicU64>) {
    let llm = Llm::start().await;
    (llm.port, llm.answered)
}

/// An LLM-like API. The prompt costs 4 tokens per message plus one per word; the completion is
/// `x-test-completion-tokens` tokens (capped by `max_tokens`). `x-test-mode` selects `error`
/// (500 that still reports usage), `no-usage` (200 without a usage object), `garbage` (200 with
/// unreadable usage), `gated` (a stream that sends its first event, then waits for the
/// [`Gate`] to open); `"stream": true` answers as server-sent events, usage in the last event.
pub struct Llm {
    pub port: u16,
    /// Requests answered (each read whole before answering).
    pub answered: Arc<AtomicU64>,
    pub gate: Arc<Gate>,
}

/// Holds a `gated` stream after its first event until the test opens it (or 10 s pass).
#[derive(Default)]
pub struct Gate {
    open: tokio::sync::Notify,
    /// The gated stream sent its last piece.
    pub finished: AtomicBool,
}

impl Gate {
    pub fn open(&self) {
        self.open.notify_one();
    }
}

impl Llm {
    pub async fn start() -> Llm {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (answered, gate) = (Arc::new(AtomicU64::new(0)), Arc::new(Gate::default()));
        let (count, held) = (answered.clone(), gate.clone());
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: String| async move {
            count.fetch_add(1, Ordering::SeqCst);
            answer(&headers, &body, held)
        });
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Llm { port, answered, gate }
    }
}

fn answer(headers: &HeaderMap, body: &str, gate: Arc<Gate>) -> axum::response::Response {
    let request: Value = serde_json::from_str(body).unwrap_or(json!({}));
    let prompt: u64 = request["messages"]
        .as_array()
        .map(|ms| ms.iter().map(|m| 4 + m["content"].as_str().unwrap_or("").split_whitespace().count() as u64).sum())
        .unwrap_or(0);
    let wanted: u64 = headers.get("x-test-completion-tokens").and_then(|v| v.to_str().ok()?.parse().ok()).unwrap_or(10);
    let completion = wanted.min(request["max_tokens"].as_u64().unwrap_or(u64::MAX));
    let mode = headers.get("x-test-mode").and_then(|v| v.to_str().ok()).unwrap_or("ok").to_owned();
    let usage = match mode.as_str() {
        "no-usage" => Value::Null,
        "garbage" => json!({"prompt_tokens": "lots", "completion_tokens": -3}),
        _ => json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}),
    };
    let status = if mode == "error" { StatusCode::INTERNAL_SERVER_ERROR } else { StatusCode::OK };
    let builder = axum::response::Response::builder().status(status);
    if request["stream"].as_bool() == Some(true) {
        // One event per token, usage in a final event of its own (as OpenAI's include_usage does),
        // sent in small pieces with pauses so the filter sees many chunks.
        let mut events: Vec<String> = (0..completion)
            .map(|i| {
                format!("data: {}\n\n", json!({"choices": [{"delta": {"content": format!("t{i} ")}}], "usage": null}))
            })
            .collect();
        events.push(format!("data: {}\n\n", json!({"choices": [], "usage": usage})));
        events.push("data: [DONE]\n\n".to_owned());
        let (first, gated) = (events[0].len(), mode == "gated");
        let text = events.concat().into_bytes();
        let pieces: Vec<Vec<u8>> = if gated {
            vec![text[..first].to_vec(), text[first..].to_vec()]
        } else {
            text.chunks(37).map(<[u8]>::to_vec).collect()
        };
        let body = stream::unfold((pieces.into_iter().enumerate(), gate), move |(mut it, gate)| async move {
            let (i, piece) = it.next()?;
            if gated && i == 1 {
                let _ = tokio::time::timeout(Duration::from_secs(10), gate.open.notified()).await;
                gate.finished.store(true, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            Some((Ok::<_, std::io::Error>(piece), (it, gate)))
        });
        return builder.header("content-type", "text/event-stream").body(Body::from_stream(body)).unwrap();
    }
    let doc = json!({"id": "chatcmpl-1", "object": "chat.completion",
        "choices": [{"message": {"role": "assistant", "content": "words ".repeat(completion as usize)}}], "usage": usage});
    builder.header("content-type", "application/json").body(Body::from(doc.to_string())).unwrap()
}
