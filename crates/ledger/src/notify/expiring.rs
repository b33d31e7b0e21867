//! `credits.grant.expiring`: once per rule and grant, `before` the grant expires while it still
//! has unused credit. Time, not a booking, causes these events, so a scan finds them; the notice
//! row and the event are written in one transaction, so each grant fires once whichever instance
//! scans.

use chrono::{DateTime, Utc};
use credits::book::in_scope;
use credits::FeatureScope;

use super::payload;
use crate::db::Db;
use crate::rule::RuleKind;
use crate::store::grants::{self, GrantRecord};
use crate::store::outbox;
use crate::store::rules::{self, RuleRecord};
use crate::store::StoreResult;

/// Grants one rule looks at per scan.
const BATCH: i64 = 500;

/// One scan of every expiring rule; returns the events written.
pub async fn scan(db: &Db, now: DateTime<Utc>) -> StoreResult<usize> {
    let rules = {
        let mut conn = db.pool().acquire().await?;
        rules::of_kind(&mut conn, RuleKind::GrantExpiring).await?
    };
    let mut written: usize = 0;
    for rule in &rules {
        written = written.saturating_add(scan_rule(db, rule, now).await?);
    }
    Ok(written)
}

fn watched(rule: &RuleRecord, g: &GrantRecord) -> bool {
    let scope = rule.spec.feature_key.clone().map(FeatureScope::Eq);
    rule.spec.applies_to(&g.customer_id)
        && rule.spec.currency.is_none_or(|c| c == g.state.grant.currency)
        && in_scope(&g.state.grant.features, scope.as_ref())
}

async fn scan_rule(db: &Db, rule: &RuleRecord, now: DateTime<Utc>) -> StoreResult<usize> {
    let Some(horizon) = rule.spec.before.and_then(|b| b.add_to(now)) else { return Ok(0) };
    let (candidates, keys) = {
        let mut conn = db.pool().acquire().await?;
        let candidates = grants::expiring_unnoticed(&mut conn, &rule.id, now, horizon, BATCH).await?;
        let ids: Vec<String> = candidates.iter().filter(|g| watched(rule, g)).map(|g| g.customer_id.clone()).collect();
        let keys = super::customer_keys(&mut conn, &ids).await?;
        (candidates, keys)
    };
    if candidates.is_empty() {
        return Ok(0);
    }
    let mut w = db.begin_write().await?;
    let mut events = Vec::new();
    for g in &candidates {
        // Every grant found is noted, so that it is not looked at again: one with nothing left,
        // and one the rule does not watch (else a batch of those would hide, scan after scan,
        // the grants it watches behind them).
        let first = outbox::claim_grant_notice(&mut w.tx, &rule.id, &g.state.grant.id.0, now).await?;
        if first && watched(rule, g) && g.state.remaining().is_ok_and(|r| r.is_positive()) {
            let key = keys.get(&g.customer_id).map_or("", String::as_str);
            events.push(payload::expiring_event(rule, g, key, now));
        }
    }
    outbox::insert(&mut w.tx, &events, now).await?;
    w.commit().await?;
    Ok(events.len())
}
