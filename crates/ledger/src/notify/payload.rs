//! The JSON bodies receivers get: `{"id", "type", "created_at", "data": {…}}`.

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::db::timestamp;
use crate::rule::threshold::{Observation, Threshold};
use crate::store::grants::GrantRecord;
use crate::store::new_id;
use crate::store::outbox::NewEvent;
use crate::store::rules::RuleRecord;

fn event(rule: &RuleRecord, customer_id: &str, data: Value, now: DateTime<Utc>) -> NewEvent {
    let id = new_id();
    let body = json!({"id": id, "type": rule.spec.kind.as_str(), "created_at": timestamp(now), "data": data});
    NewEvent {
        id,
        kind: rule.spec.kind.as_str(),
        rule_id: rule.id.clone(),
        customer_id: customer_id.to_owned(),
        payload: body.to_string(),
        channels: rule.spec.channels.clone(),
    }
}

fn scope(rule: &RuleRecord, data: &mut Value) {
    if let (Some(f), Value::Object(map)) = (&rule.spec.feature_key, data) {
        map.insert("feature_key".into(), json!(f.as_str()));
    }
}

/// `credits.balance.threshold`: the balance as `GET …/credits/balance` reports it, and the
/// threshold crossed (with the amount a percent threshold stood for).
pub fn threshold_event(
    rule: &RuleRecord,
    customer_id: &str,
    customer_key: &str,
    threshold: &Threshold,
    obs: &Observation,
    now: DateTime<Utc>,
) -> NewEvent {
    let b = &obs.balance;
    let level = threshold.level(obs.granted).map(|l| l.to_string());
    let mut data = json!({
        "rule": {"id": rule.id, "name": rule.spec.name},
        "customer": {"id": customer_id, "key": customer_key},
        "currency": b.currency.as_str(),
        "balance": {"settled": b.settled.to_string(), "live": b.live.to_string(), "pending": b.pending.to_string()},
        "threshold": {"type": threshold.kind, "value": threshold.value.to_string(), "amount": level},
    });
    scope(rule, &mut data);
    event(rule, customer_id, data, now)
}

/// `credits.grant.expiring`: the grant and what of it will expire unused if nothing spends it.
pub fn expiring_event(rule: &RuleRecord, grant: &GrantRecord, customer_key: &str, now: DateTime<Utc>) -> NewEvent {
    let g = &grant.state.grant;
    let features: Vec<&str> = g.features.features().iter().map(|f| f.as_str()).collect();
    let mut data = json!({
        "rule": {"id": rule.id, "name": rule.spec.name},
        "customer": {"id": grant.customer_id, "key": customer_key},
        "currency": g.currency.as_str(),
        "grant": {
            "id": g.id.0, "name": grant.name, "amount": g.amount.to_string(),
            "remaining": grant.state.remaining().unwrap_or(credits::Amount::ZERO).to_string(),
            "expires_at": g.expires_at.map(timestamp), "features": features,
        },
    });
    scope(rule, &mut data);
    event(rule, &grant.customer_id, data, now)
}
