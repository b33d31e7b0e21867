//! Notifications: rules that watch balances and grants, events written to an outbox in the
//! transaction that caused them, and a background job that delivers them to webhook channels
//! (Standard Webhooks), retried with exponential backoff and claimed by one instance at a time.

pub mod delivery;
pub mod expiring;
pub mod payload;
pub mod signature;

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use credits::Book;
use sqlx::Row;

use crate::db::{rows, Tx};
use crate::rule::threshold::{self, transition, Observation, Transition};
use crate::rule::RuleKind;
use crate::store::outbox::{self, NewEvent};
use crate::store::rules::{self, RuleRecord};
use crate::store::StoreResult;

/// A threshold of a rule that a customer's booking crossed.
struct Crossed<'a> {
    rule: &'a RuleRecord,
    customer_id: &'a str,
    threshold: &'a threshold::Threshold,
    observation: Observation,
}

/// Evaluates the threshold rules for customers whose books this transaction changed and writes
/// the events that fired, with their deliveries, in the same transaction. Returns how many.
/// One query when no threshold rule exists.
pub async fn on_bookings(tx: &mut Tx, books: &[(&str, &Book)], now: DateTime<Utc>) -> StoreResult<usize> {
    let rules = rules::of_kind(tx, RuleKind::BalanceThreshold).await?;
    if rules.is_empty() || books.is_empty() {
        return Ok(0);
    }
    let ids: Vec<String> = books.iter().map(|(c, _)| (*c).to_owned()).collect();
    let fired = outbox::fired(tx, &ids).await?;
    let (mut crossed, mut fire, mut rearm) = (Vec::new(), Vec::new(), Vec::new());
    for &(customer_id, book) in books {
        for rule in rules.iter().filter(|r| r.spec.applies_to(customer_id)) {
            let Some(currency) = rule.spec.currency else { continue };
            let Some(obs) = Observation::of(book, currency, rule.spec.feature_key.as_ref(), now) else { continue };
            for t in &rule.spec.thresholds {
                let Some(below) = obs.is_below(t) else { continue };
                let state = (rule.id.clone(), customer_id.to_owned(), t.key());
                match transition(below, fired.contains(&state)) {
                    Transition::Fire => {
                        fire.push(state);
                        crossed.push(Crossed { rule, customer_id, threshold: t, observation: obs.clone() });
                    }
                    Transition::Rearm => rearm.push(state),
                    Transition::Unchanged => {}
                }
            }
        }
    }
    outbox::set_fired(tx, &fire, &rearm, now).await?;
    if crossed.is_empty() {
        return Ok(0);
    }
    let keys = customer_keys(tx, &crossed.iter().map(|c| c.customer_id.to_owned()).collect::<Vec<_>>()).await?;
    let events: Vec<NewEvent> = crossed
        .iter()
        .map(|c| {
            let key = keys.get(c.customer_id).map_or("", String::as_str);
            payload::threshold_event(c.rule, c.customer_id, key, c.threshold, &c.observation, now)
        })
        .collect();
    outbox::insert(tx, &events, now).await?;
    Ok(events.len())
}

/// The keys of customers, by id (events name both).
pub async fn customer_keys(conn: &mut sqlx::AnyConnection, ids: &[String]) -> StoreResult<HashMap<String, String>> {
    let mut out = HashMap::new();
    for r in rows::fetch_by_ids(conn, "SELECT id, key FROM customers WHERE id IN ({list})", ids).await? {
        out.insert(r.try_get(0)?, r.try_get(1)?);
    }
    Ok(out)
}
