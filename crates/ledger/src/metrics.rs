//! Prometheus metrics: requests and latencies per route, bookings per movement kind.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use credits::Entry;

const BUCKETS_SECONDS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS_SECONDS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, String, u16), u64>,
    latency: BTreeMap<String, Histogram>,
    bookings: BTreeMap<&'static str, u64>,
    counters: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Counters saturate: a counter at u64::MAX is wrong by too little to matter, a wrapped one is not.
fn bump(counter: &mut u64, n: u64) {
    *counter = counter.saturating_add(n);
}

impl Metrics {
    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        // Clients name the method, token or not: any other name would be a series of its own.
        const KNOWN: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"];
        let method = if KNOWN.contains(&method) { method } else { "other" };
        let Ok(mut inner) = self.inner.lock() else { return };
        bump(inner.requests.entry((method.to_owned(), route.to_owned(), status)).or_default(), 1);
        let h = inner.latency.entry(route.to_owned()).or_default();
        let secs = elapsed.as_secs_f64();
        for (i, bound) in BUCKETS_SECONDS.iter().enumerate() {
            if secs <= *bound {
                bump(&mut h.buckets[i], 1);
            }
        }
        bump(&mut h.count, 1);
        h.sum += secs;
    }

    pub fn count_entries(&self, entries: &[Entry]) {
        let Ok(mut inner) = self.inner.lock() else { return };
        for e in entries {
            let kind = match e {
                Entry::Movement(m) => m.kind.as_str(),
                Entry::Overage { .. } => "overage",
                Entry::DebtCovered { .. } => "debt_covered",
            };
            bump(inner.bookings.entry(kind).or_default(), 1);
        }
    }

    /// Adds to a named counter (`credits_ledger_<name>_total`).
    pub fn add(&self, name: &'static str, n: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            bump(inner.counters.entry(name).or_default(), n);
        }
    }

    pub fn render(&self) -> String {
        let Ok(inner) = self.inner.lock() else { return String::new() };
        let mut out = String::new();
        out.push_str("# HELP credits_ledger_requests_total HTTP requests by method, route and status.\n");
        out.push_str("# TYPE credits_ledger_requests_total counter\n");
        for ((method, route, status), n) in &inner.requests {
            let _ = writeln!(
                out,
                "credits_ledger_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP credits_ledger_request_duration_seconds Request latency by route.\n");
        out.push_str("# TYPE credits_ledger_request_duration_seconds histogram\n");
        for (route, h) in &inner.latency {
            for (bound, n) in BUCKETS_SECONDS.iter().zip(h.buckets) {
                let _ = writeln!(
                    out,
                    "credits_ledger_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "credits_ledger_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "credits_ledger_request_duration_seconds_sum{{route=\"{route}\"}} {}", h.sum);
            let _ = writeln!(out, "credits_ledger_request_duration_seconds_count{{route=\"{route}\"}} {}", h.count);
        }
        out.push_str("# HELP credits_ledger_bookings_total Journal entries booked by kind.\n");
        out.push_str("# TYPE credits_ledger_bookings_total counter\n");
        for (kind, n) in &inner.bookings {
            let _ = writeln!(out, "credits_ledger_bookings_total{{kind=\"{kind}\"}} {n}");
        }
        for (name, n) in &inner.counters {
            let _ = writeln!(out, "# TYPE credits_ledger_{name}_total counter\ncredits_ledger_{name}_total {n}");
        }
        out
    }
}
