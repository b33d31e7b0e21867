//! The `cached` strategy's overspend bound (README, "cached (bounded staleness)"): every node
//! spends from the live balance of its last sync answer, so across nodes a customer can be let
//! through more than its credit, by at most what each node lets through in one sync interval
//! plus the ledger round trip. Three nodes (two workers each, their clocks apart) call at steady,
//! different rates until the credit is long gone, on a network that loses nothing (the bound
//! assumes the syncs arrive), against the credit model and against the real ledger.

use super::backend::{at, GrantPlan, Ledger};
use super::model_ledger::ModelLedger;
use super::sqlite_ledger::SqliteLedger;
use super::world::{credit_until, Action, Scenario, Sim, NODES, START_MS, SUBJECT, WORKERS};
use crate::config::FilterConfig;

/// The customer's credit, in calls.
const CREDIT_CALLS: u64 = 2_000;
/// Each node's calls come this many milliseconds apart (500, 333 and 200 calls/s).
const PERIODS_MS: [u64; NODES] = [2, 3, 5];
/// Long enough to spend the credit twice over.
const RUN_MS: u64 = 4_000;

/// The credit: one grant that never expires.
fn grant() -> GrantPlan {
    GrantPlan { calls: CREDIT_CALLS, priority: 1, effective_ms: START_MS, expires_after_ms: None }
}

/// The lease TTL is unused under `cached`; the simulated network delays requests by up to a
/// tenth of it (99 ms), as under `lease`.
fn cached_config() -> FilterConfig {
    let json = r#"{"ledger": {"upstream": "ledger", "token": "t", "timeout_ms": 200}, "price": "0.01", "currency": "USD",
        "feature_key": "api_requests", "sync": {"strategy": "cached", "interval_ms": 100}, "lease": {"ttl_ms": 1000}}"#;
    FilterConfig::parse(json.as_bytes()).unwrap()
}

/// The most of `admitted` (sorted instants) that fall within any `window_ms`.
fn busiest_window(admitted: &[u64], window_ms: u64) -> u64 {
    let mut most = 0;
    let mut start = 0;
    for (end, at) in admitted.iter().enumerate() {
        while admitted[start] + window_ms <= *at {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most as u64
}

/// Runs the nodes against `ledger` with the network's delays drawn from `noise`; the overspend
/// and its bound, in calls.
fn run<L: Ledger>(noise: u64, ledger: impl FnOnce(&FilterConfig) -> L) -> Result<(u64, u64), String> {
    let scenario = Scenario { kong: false, skews_ms: [0, 7, 19], noise, grants: vec![grant()], actions: Vec::new() };
    let config = cached_config();
    let mut sim = Sim::new(&scenario, config.clone(), ledger);
    sim.reliable_network();
    for t in 0..RUN_MS {
        for (node, period) in PERIODS_MS.iter().enumerate() {
            if t % period == 0 {
                sim.step(&Action::Call { node, worker: (t / period) as usize % WORKERS });
            }
        }
        sim.step(&Action::Advance { ms: 1, fates: 0 });
        sim.deliver_arrived();
        sim.audit_records().map_err(|e| format!("at t={}ms: {e}", sim.now))?;
    }
    sim.drain();
    sim.audit_booked_once().map_err(|e| format!("after the drain: {e}"))?;

    let credit = credit_until(&sim.ledger.books().book, sim.now);
    let spent = config.price.times(sim.let_through()).unwrap();
    if spent < credit {
        return Err(format!("the nodes stopped at {spent} with credit {credit} left"));
    }
    let overspend = sim.let_through() - CREDIT_CALLS;
    let window_ms = u64::from(config.sync.interval_ms) + sim.round_trip_ms();
    let bound = (0..NODES).map(|n| busiest_window(sim.admitted_at(n), window_ms)).sum();
    Ok((overspend, bound))
}

fn assert_within_bound<L: Ledger>(ledger: impl Fn(&FilterConfig) -> L) {
    for noise in 0..4 {
        let (overspend, bound) = run(noise, &ledger).unwrap_or_else(|e| panic!("noise {noise}: {e}"));
        eprintln!("noise {noise}: {overspend} calls beyond the credit, bound {bound}");
        assert!(overspend <= bound, "noise {noise}: {overspend} calls let through beyond the credit, bound {bound}");
    }
}

#[test]
fn busiest_window_counts_the_most_calls_in_any_window() {
    assert_eq!(busiest_window(&[], 10), 0);
    assert_eq!(busiest_window(&[0, 5, 9, 10, 19, 30], 10), 3);
    assert_eq!(busiest_window(&[4, 4, 4, 13, 14], 10), 4);
}

#[test]
fn cached_overspend_stays_within_one_interval_and_round_trip_per_node_on_the_credit_model() {
    assert_within_bound(|config| ModelLedger::new(SUBJECT, config.price, &[grant()], at(START_MS)));
}

#[test]
fn cached_overspend_stays_within_one_interval_and_round_trip_per_node_on_the_real_ledger() {
    assert_within_bound(|config| SqliteLedger::new(SUBJECT, config.price, &[grant()], at(START_MS)));
}
