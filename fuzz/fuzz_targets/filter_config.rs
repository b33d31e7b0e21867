#![no_main]
//! The filter's configuration parser (`FilterConfig::parse`, run by every Kong/Envoy configure):
//! any bytes give a configuration that keeps the documented bounds, or an error naming a field.
//! Never a panic (the filter would take the host's worker down with it).

use libfuzzer_sys::fuzz_target;
use prepaid_credits::config::FilterConfig;

fuzz_target!(|data: &[u8]| {
    match FilterConfig::parse(data) {
        Ok(c) => {
            assert!((1..=60_000).contains(&c.ledger.timeout_ms), "timeout_ms {}", c.ledger.timeout_ms);
            assert!((50..=60_000).contains(&c.sync.interval_ms), "interval_ms {}", c.sync.interval_ms);
            let round_trip = u64::from(c.sync.interval_ms) + u64::from(c.ledger.timeout_ms);
            assert!(c.lease.ttl_ms >= 3 * round_trip, "ttl_ms {} < 3 × {round_trip}", c.lease.ttl_ms);
            assert!(c.lease.min_calls <= c.lease.max_calls, "min_calls > max_calls");
            assert!(!c.ledger.token.is_empty() && !c.ledger.upstream.is_empty());
            let _ = c.ledger.upstream_is_host_name();
        }
        // The field may be "" only when that is the name at fault (an unknown key "").
        Err(e) => assert!(!e.message.is_empty() && (!e.field.is_empty() || e.message.contains("``")), "{e:?}"),
    }
});
