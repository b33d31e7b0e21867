//! Reading the units a call reports: a count in a header, at a JSON pointer of a response body,
//! or in the last event of a `text/event-stream` that carries it. Reading never holds the
//! response back: the adapter passes every chunk on and feeds a copy here, and what does not fit
//! the configured limit is not read (the call is then charged per `pricing.missing_usage`).

use credits::Amount;
use serde_json::Value;

use crate::pricing::{count_from_json, Pricing, UnitSource};

/// Reads units from a response body as it streams past.
#[derive(Debug)]
pub struct BodyReader {
    /// Per rule: the pointer to read, if the rule reads the body.
    pointers: Vec<Option<String>>,
    limit: usize,
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    /// A JSON document: kept until complete (up to the limit), read once.
    Json { body: Vec<u8>, overflow: bool },
    /// Server-sent events: each complete event is read as it arrives, the last value wins; only
    /// the event in progress is kept.
    Events { pending: Vec<u8>, scanned: usize, seen: Vec<Option<Amount>>, skipping: bool },
}

impl BodyReader {
    /// `content_type` is the response's; `text/event-stream` selects event reading.
    pub fn new(pricing: &Pricing, content_type: Option<&str>) -> BodyReader {
        let pointers: Vec<Option<String>> = pricing
            .units
            .iter()
            .map(|u| match &u.source {
                UnitSource::ResponseJson(p) => Some(p.clone()),
                _ => None,
            })
            .collect();
        let events = content_type
            .is_some_and(|t| t.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream")));
        let mode = if events {
            Mode::Events { pending: Vec::new(), scanned: 0, seen: vec![None; pointers.len()], skipping: false }
        } else {
            Mode::Json { body: Vec::new(), overflow: false }
        };
        BodyReader { pointers, limit: pricing.max_body_bytes, mode }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Json { body, overflow } => {
                if *overflow || body.len() + chunk.len() > self.limit {
                    *overflow = true;
                    body.clear();
                } else {
                    body.extend_from_slice(chunk);
                }
            }
            Mode::Events { pending, scanned, seen, skipping } => {
                pending.extend_from_slice(chunk);
                // Only the new bytes are scanned (and the three before them: a separator may
                // straddle two chunks).
                while let Some((end, sep)) = event_end(pending, scanned.saturating_sub(3)) {
                    // An event larger than the limit is not read; the stream goes on.
                    if !*skipping && end <= self.limit {
                        read_event(&pending[..end], &self.pointers, seen);
                    }
                    *skipping = false;
                    pending.drain(..end + sep);
                    *scanned = 0;
                }
                *scanned = pending.len();
                if pending.len() > self.limit {
                    *skipping = true;
                    pending.clear();
                    *scanned = 0;
                }
            }
        }
    }

    /// The units found, per rule (`None` for rules that do not read the body, or found nothing).
    pub fn finish(mut self) -> Vec<Option<Amount>> {
        match &mut self.mode {
            Mode::Json { body, overflow } => {
                let doc: Option<Value> = if *overflow { None } else { serde_json::from_slice(body).ok() };
                self.pointers
                    .iter()
                    .map(|p| {
                        Some((p.as_ref()?, doc.as_ref()?)).and_then(|(p, d)| d.pointer(p)).and_then(count_from_json)
                    })
                    .collect()
            }
            Mode::Events { pending, seen, skipping, .. } => {
                // A last event without its blank line still counts.
                if !*skipping && !pending.is_empty() {
                    read_event(pending, &self.pointers, seen);
                }
                std::mem::take(seen)
            }
        }
    }
}

/// Where the first complete event in `buf` ends (its blank line found at or after `from`), and
/// the length of the blank line.
fn event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i + 1 < buf.len() {
        match &buf[i..] {
            [b'\n', b'\n', ..] => return Some((i, 2)),
            [b'\r', b'\n', b'\r', b'\n', ..] => return Some((i, 4)),
            [b'\r', b'\r', ..] => return Some((i, 2)),
            _ => i += 1,
        }
    }
    None
}

/// Reads one event's `data:` lines as JSON; values found overwrite earlier ones.
fn read_event(event: &[u8], pointers: &[Option<String>], seen: &mut [Option<Amount>]) {
    let Ok(text) = std::str::from_utf8(event) else { return };
    let data: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
    if data.is_empty() {
        return;
    }
    let Ok(doc) = serde_json::from_str::<Value>(&data.join("\n")) else { return };
    for (p, slot) in pointers.iter().zip(seen.iter_mut()) {
        if let Some(n) = p.as_ref().and_then(|p| doc.pointer(p)).and_then(count_from_json) {
            *slot = Some(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FilterConfig;

    fn amt(s: &str) -> Amount {
        Amount::parse(s).unwrap()
    }

    fn pricing(max_body_bytes: u64) -> Pricing {
        let json = format!(
            r#"{{"ledger": {{"upstream": "l", "token": "t"}}, "price": "0", "currency": "USD",
            "pricing": {{"max_body_bytes": {max_body_bytes}, "units": [
                {{"name": "in", "unit_price": "1", "source": {{"response_json": "/usage/prompt_tokens"}}}},
                {{"name": "out", "unit_price": "1", "source": {{"response_json": "/usage/completion_tokens"}}}},
                {{"name": "h", "unit_price": "1", "source": {{"response_header": "x-units"}}}}
            ]}}}}"#
        );
        FilterConfig::parse(json.as_bytes()).unwrap().pricing
    }

    fn read(content_type: Option<&str>, chunks: &[&[u8]], limit: u64) -> Vec<Option<Amount>> {
        let mut r = BodyReader::new(&pricing(limit), content_type);
        for c in chunks {
            r.feed(c);
        }
        r.finish()
    }

    #[test]
    fn a_json_body_split_anywhere_is_read_at_its_pointers() {
        let body = br#"{"id": "x", "usage": {"prompt_tokens": 12, "completion_tokens": 30}}"#;
        for split in [1, 10, 40, body.len() - 1] {
            let (a, b) = body.split_at(split);
            assert_eq!(
                read(Some("application/json"), &[a, b], 4096),
                [Some(amt("12")), Some(amt("30")), None],
                "split at {split}"
            );
        }
    }

    #[test]
    fn missing_garbage_and_oversized_bodies_report_nothing() {
        assert_eq!(read(None, &[br#"{"usage": {"prompt_tokens": "many"}}"#], 4096), [None, None, None]);
        assert_eq!(read(None, &[b"<html>oops</html>"], 4096), [None, None, None]);
        assert_eq!(read(None, &[], 4096), [None, None, None]);
        let mut huge = br#"{"pad": ""#.to_vec();
        huge.extend(std::iter::repeat_n(b'x', 5000));
        huge.extend_from_slice(br#"", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}"#);
        assert_eq!(read(None, &[&huge[..3000], &huge[3000..]], 4096), [None, None, None]);
    }

    #[test]
    fn a_stream_is_read_from_the_last_event_that_reports_usage() {
        let stream = concat!(
            "data: {\"choices\": [{\"delta\": {\"content\": \"Hel\"}}], \"usage\": null}\n\n",
            ": keep-alive\n\n",
            "data: {\"choices\": [{\"delta\": {\"content\": \"lo\"}}]}\r\n\r\n",
            "event: message\ndata: {\"choices\": [], \"usage\": {\"prompt_tokens\": 9,\n",
            "data: \"completion_tokens\": 2}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for split in [1, 7, 60, 150, stream.len() - 3] {
            let (a, b) = stream.split_at(split);
            assert_eq!(
                read(Some("text/event-stream; charset=utf-8"), &[a, b], 4096),
                [Some(amt("9")), Some(amt("2")), None],
                "split at {split}"
            );
        }
    }

    mod chunking {
        use super::*;
        use proptest::prelude::*;

        /// One piece of a stream: an event reporting some counts, one reporting none, a comment,
        /// an event too large to read, or a stray separator; each ended by one of the three
        /// separators the format allows.
        fn piece() -> impl Strategy<Value = Vec<u8>> {
            let event = prop_oneof![
                (0u32..1000, 0u32..1000).prop_map(|(i, o)| format!(
                    "data: {{\"usage\": {{\"prompt_tokens\": {i},\ndata: \"completion_tokens\": {o}}}}}"
                )),
                Just("data: {\"choices\": [{\"delta\": {\"content\": \"hi\"}}]}".to_owned()),
                Just(": keep-alive".to_owned()),
                // Too large to read; its last line alone would read as a count.
                (0u32..1000).prop_map(|i| format!(
                    "data: \"{}\"\ndata: {{\"usage\": {{\"prompt_tokens\": {i}}}}}",
                    "z".repeat(1100)
                )),
                Just(String::new()),
            ];
            let end = prop_oneof![Just("\n\n"), Just("\r\n\r\n"), Just("\r\r")];
            (event, end).prop_map(|(e, end)| format!("{e}{end}").into_bytes())
        }

        proptest! {
            /// However the network cuts a body into chunks, it reads the same as in one piece.
            #[test]
            fn a_body_reads_the_same_however_it_is_chunked(
                pieces in proptest::collection::vec(piece(), 0..12),
                tail in prop_oneof![
                    Just(String::new()),
                    Just("\r".to_owned()),
                    // A last event without its blank line: read if it fits.
                    Just("data: {\"usage\": {\"completion_tokens\": 4}}".to_owned()),
                    Just(format!("data: \"{}\"\ndata: {{\"usage\": {{\"completion_tokens\": 4}}}}", "z".repeat(1100))),
                ],
                sizes in proptest::collection::vec(1usize..8, 1..4),
                events in any::<bool>(),
                (pad, tokens) in (900usize..1100, 0u32..1000),
            ) {
                let (body, content_type) = if events {
                    let mut body = pieces.concat();
                    body.extend_from_slice(tail.as_bytes());
                    (body, "text/event-stream")
                } else {
                    // A JSON document around the limit: read whole, or not at all.
                    let doc = format!(r#"{{"pad": "{}", "usage": {{"prompt_tokens": {tokens}}}}}"#, "z".repeat(pad));
                    (doc.into_bytes(), "application/json")
                };
                // The padded events are larger than the limit and never read.
                let whole = read(Some(content_type), &[&body], 1024);
                if !events {
                    let fits = body.len() <= 1024;
                    prop_assert_eq!(&whole[..1], &[fits.then(|| Amount::from(u64::from(tokens)))]);
                }
                // Small chunks of the sizes given in turn: every kind of boundary is crossed.
                let mut chunks = Vec::new();
                let (mut from, mut turn) = (0, sizes.iter().cycle());
                while from < body.len() {
                    let to = (from + turn.next().copied().unwrap_or(1)).min(body.len());
                    chunks.push(&body[from..to]);
                    from = to;
                }
                prop_assert_eq!(read(Some(content_type), &chunks, 1024), whole);
            }
        }
    }

    #[test]
    fn a_long_stream_keeps_only_the_event_in_progress_and_skips_oversized_events() {
        let mut r = BodyReader::new(&pricing(1024), Some("text/event-stream"));
        for _ in 0..10_000 {
            r.feed(b"data: {\"choices\": [{\"delta\": {\"content\": \"token\"}}]}\n\n");
        }
        let big = format!("data: {{\"pad\": \"{}\", \"usage\": {{\"prompt_tokens\": 99}}}}\n\n", "y".repeat(3000));
        r.feed(big.as_bytes());
        r.feed(b"data: {\"usage\": {\"completion_tokens\": 5}}");
        if let Mode::Events { pending, .. } = &r.mode {
            assert!(pending.len() <= 1024);
        }
        assert_eq!(r.finish(), [None, Some(amt("5")), None]);
    }
}
