//! Request bodies of authenticated calls: read whole, up to `--max-body-bytes`, before the
//! handler runs. A larger body is answered 413 with `Connection: close` — and so that the client
//! can read that answer, the rest of its body is read and thrown away first (bounded in bytes and
//! time). Closing a connection whose client is still sending makes the kernel reset it, and the
//! client sees "broken pipe" or "connection reset" instead of the 413.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;

use super::problem::Problem;
use super::AppState;

/// An oversized body is drained up to this many times the limit (16 MiB at the default 1 MiB);
/// one declared larger than the limit plus that is refused at once, unread.
pub const DRAIN_LIMIT_FACTOR: usize = 16;

/// Draining an oversized body stops after this long (a client that sends slowly gets the 413 and
/// a closed connection all the same).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The middleware: reads the body within the limit and hands it to the handler, or answers 413.
pub async fn bounded(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = state.max_body_bytes;
    let drain_budget = limit.saturating_mul(DRAIN_LIMIT_FACTOR);
    let (parts, mut body) = req.into_parts();
    if let Some(declared) = declared_length(&parts.headers).filter(|n| *n > limit) {
        // A client waiting for `100 Continue` has not sent the body: nothing to drain.
        if declared <= drain_budget && !expects_continue(&parts.headers) {
            drain(&mut body, drain_budget).await;
        }
        return too_large(limit);
    }
    match read_within(&mut body, limit).await {
        Ok(Some(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(None) => {
            drain(&mut body, drain_budget).await;
            too_large(limit)
        }
        Err(e) => {
            Problem::new(StatusCode::BAD_REQUEST, format!("could not read the request body: {e}")).into_response()
        }
    }
}

fn declared_length(headers: &HeaderMap) -> Option<usize> {
    let value = headers.get(header::CONTENT_LENGTH)?.to_str().ok()?;
    // A length beyond usize is over any limit.
    Some(value.trim().parse::<u128>().ok()?.try_into().unwrap_or(usize::MAX))
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers.get(header::EXPECT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// The whole body if it has at most `limit` bytes; `None` (with the rest unread) if it has more.
async fn read_within(body: &mut Body, limit: usize) -> Result<Option<Bytes>, axum::Error> {
    let mut buffer = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if data.len() > limit.saturating_sub(buffer.len()) {
                return Ok(None);
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(Some(Bytes::from(buffer)))
}

/// Reads and discards what is left of `body`: at most `budget` bytes, for at most
/// [`DRAIN_TIMEOUT`]. Whatever is left then is not read (the connection closes anyway).
async fn drain(body: &mut Body, budget: usize) {
    let discard = async {
        let mut left = budget;
        while let Some(Ok(frame)) = body.frame().await {
            let size = frame.data_ref().map_or(0, Bytes::len);
            match left.checked_sub(size) {
                Some(rest) => left = rest,
                None => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, discard).await;
}

fn too_large(limit: usize) -> Response {
    let detail = format!("the request body is larger than this ledger accepts ({limit} bytes, --max-body-bytes)");
    let mut response = Problem::new(StatusCode::PAYLOAD_TOO_LARGE, detail).into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
