//! Three nodes (two workers each, their clocks apart) taking calls at steady, different rates on
//! a network that loses nothing (requests reach the ledger within 99 ms), against the credit
//! model and the real ledger, for the README's bounds that assume the syncs arrive:
//! - `cached`: every node spends from the live balance of its last sync answer, so across nodes
//!   a customer can be let through more than its credit, by at most what each node lets through
//!   in one sync interval plus the ledger round trip ("cached (bounded staleness)");
//! - a node killed (or a Kong reload, which wipes shared data) loses at most the calls it had not
//!   reported: those of one sync interval plus the round trip.

use super::backend::{at, GrantPlan, Ledger};
use super::model_ledger::ModelLedger;
use super::sqlite_ledger::SqliteLedger;
use super::world::{self, credit_until, Action, Scenario, Sim, NODES, START_MS, SUBJECT, WORKERS};
use crate::config::FilterConfig;

/// Each node's calls come this many milliseconds apart (500, 333 and 200 calls/s).
const PERIODS_MS: [u64; NODES] = [2, 3, 5];
/// Long enough to spend the `cached` test's credit twice over.
const RUN_MS: u64 = 4_000;

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

/// Runs the nodes for [`RUN_MS`] on a credit of `credit_calls` calls, with the network's delays
/// drawn from `noise` (odd: under Kong's shared-data rules), killing node `n` at `t` ms into the
/// run for each `(t, n)` of `kills`, then drains; every call is booked once but what the kills
/// lost.
fn run<L: Ledger>(
    config: &FilterConfig,
    credit_calls: u64,
    noise: u64,
    kills: &[(u64, usize)],
    ledger: impl FnOnce(&FilterConfig, &[GrantPlan]) -> L,
) -> Result<Sim<L>, String> {
    let grants = vec![GrantPlan { calls: credit_calls, priority: 1, effective_ms: START_MS, expires_after_ms: None }];
    let scenario = Scenario {
        kong: noise % 2 == 1,
        skews_ms: [0, 7, 19],
        noise,
        grants,
        actions: Vec::new(),
        priced_by_response: false,
        faulty_upstream: false,
    };
    let mut sim = Sim::new(&scenario, config.clone(), |c| ledger(c, &scenario.grants));
    sim.reliable_network();
    for t in 0..RUN_MS {
        for (_, node) in kills.iter().filter(|(at, _)| *at == t) {
            sim.step(&Action::Kill { node: *node });
        }
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
    Ok(sim)
}

/// The longest a node's calls can wait to be reported: a sync interval plus the round trip.
fn report_window_ms<L: Ledger>(sim: &Sim<L>) -> u64 {
    u64::from(sim.config.sync.interval_ms) + sim.round_trip_ms()
}

fn cached_overspend_within_bound<L: Ledger>(ledger: impl Fn(&FilterConfig, &[GrantPlan]) -> L) {
    const CREDIT_CALLS: u64 = 2_000;
    let config = cached_config();
    for noise in 0..4 {
        let mut sim = run(&config, CREDIT_CALLS, noise, &[], &ledger).unwrap_or_else(|e| panic!("noise {noise}: {e}"));
        let credit = credit_until(&sim.ledger.books().book, sim.now);
        assert!(config.price.times(sim.let_through()).unwrap() >= credit, "noise {noise}: the credit was spent");
        let overspend = sim.let_through() - CREDIT_CALLS;
        let bound: u64 = (0..NODES).map(|n| busiest_window(sim.admitted_at(n), report_window_ms(&sim))).sum();
        eprintln!("noise {noise}: {overspend} calls beyond the credit, bound {bound}");
        assert!(overspend <= bound, "noise {noise}: {overspend} calls let through beyond the credit, bound {bound}");
    }
}

fn a_killed_node_loses_at_most_its_unreported_calls<L: Ledger>(ledger: impl Fn(&FilterConfig, &[GrantPlan]) -> L) {
    let kills = [(1_337, 0), (2_550, 1), (2_551, 2), (3_777, 0)];
    for (name, config) in [("lease", world::config(false)), ("cached", cached_config())] {
        for noise in 0..2 {
            let sim = run(&config, 1_000_000, noise, &kills, &ledger)
                .unwrap_or_else(|e| panic!("{name}, noise {noise}: {e}"));
            for &(node, at_ms, unreported) in &sim.kills {
                let window = report_window_ms(&sim);
                let recent = sim.admitted_at(node).iter().filter(|t| **t + window > at_ms).count() as u64;
                assert!(
                    unreported <= recent,
                    "{name}, noise {noise}: node {node} killed at {at_ms} ms with {unreported} calls unreported, \
                     {recent} let through in the {window} ms before"
                );
            }
            let unreported: u64 = sim.kills.iter().map(|k| k.2).sum();
            eprintln!("{name}, noise {noise}: {} calls lost, {unreported} unreported at the kills", sim.stats.lost);
            assert!(unreported > 0, "{name}, noise {noise}: the kills caught calls unreported");
        }
    }
}

fn model(config: &FilterConfig, grants: &[GrantPlan]) -> ModelLedger {
    ModelLedger::new(SUBJECT, config.price, grants, at(START_MS))
}

fn sqlite(config: &FilterConfig, grants: &[GrantPlan]) -> SqliteLedger {
    SqliteLedger::new(SUBJECT, config.price, grants, at(START_MS))
}

#[test]
fn busiest_window_counts_the_most_calls_in_any_window() {
    assert_eq!(busiest_window(&[], 10), 0);
    assert_eq!(busiest_window(&[0, 5, 9, 10, 19, 30], 10), 3);
    assert_eq!(busiest_window(&[4, 4, 4, 13, 14], 10), 4);
}

#[test]
fn cached_overspend_stays_within_one_interval_and_round_trip_per_node_on_the_credit_model() {
    cached_overspend_within_bound(model);
}

#[test]
fn cached_overspend_stays_within_one_interval_and_round_trip_per_node_on_the_real_ledger() {
    cached_overspend_within_bound(sqlite);
}

#[test]
fn a_killed_node_loses_at_most_one_interval_and_round_trip_of_calls_on_the_credit_model() {
    a_killed_node_loses_at_most_its_unreported_calls(model);
}

#[test]
fn a_killed_node_loses_at_most_one_interval_and_round_trip_of_calls_on_the_real_ledger() {
    a_killed_node_loses_at_most_its_unreported_calls(sqlite);
}
