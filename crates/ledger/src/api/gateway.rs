//! `POST /v3/gateway/sync`: the one round trip a gateway worker makes per tick. It books the
//! usage ranges the worker sends (exactly once per range key) and answers each subject's live
//! balance after the booking.

use axum::extract::State;
use credits::sync::{
    SubjectAnswer, SubjectOutcome, SubjectSync, SyncRequest, SyncResponse, UsageOutcome, MAX_CALLS_PER_RANGE,
    MAX_SUBJECTS_PER_SYNC,
};
use credits::{FeatureScope, Spend};

use super::problem::{ApiResult, Problem};
use super::request::Json;
use super::AppState;
use crate::customer_tx::CustomerTx;
use crate::store::books::Operation;
use crate::store::usage::{self, UsageRecord};
use crate::store::{customers, Labels};

/// A reason to reject one subject's part of a sync (the rest of the batch still goes through).
fn invalid(s: &SubjectSync) -> Option<String> {
    if s.subject.is_empty() || s.subject.len() > 256 {
        return Some("subject must have 1..256 characters".into());
    }
    let r = s.usage.as_ref()?;
    if r.from >= r.to {
        return Some(format!("usage range {}..{} is empty", r.from, r.to));
    }
    if r.calls() > MAX_CALLS_PER_RANGE {
        return Some(format!("usage range holds more than {MAX_CALLS_PER_RANGE} calls"));
    }
    if r.amount.is_negative() {
        return Some("usage amount must not be negative".into());
    }
    None
}

#[utoipa::path(post, path = "/v3/gateway/sync", request_body(content = serde_json::Value, description = "credits::sync::SyncRequest"),
    responses((status = 200, description = "credits::sync::SyncResponse: one answer per subject, in order"), (status = 400), (status = 401)))]
pub async fn sync(State(state): State<AppState>, Json(req): Json<SyncRequest>) -> ApiResult<axum::Json<SyncResponse>> {
    if req.node.is_empty() || req.node.len() > 128 {
        return Err(Problem::bad_request("node", "node must have 1..128 characters"));
    }
    if req.subjects.len() > MAX_SUBJECTS_PER_SYNC {
        return Err(Problem::bad_request("subjects", format!("at most {MAX_SUBJECTS_PER_SYNC} subjects per sync")));
    }
    let mut answers = Vec::with_capacity(req.subjects.len());
    for s in &req.subjects {
        let outcome = match invalid(s) {
            Some(reason) => SubjectOutcome::Rejected { reason },
            None => sync_subject(&state, &req.node, s).await?,
        };
        answers.push(SubjectAnswer { subject: s.subject.clone(), outcome });
    }
    let mut conn = state.db.pool().acquire().await?;
    let server_time = state.db.now(&mut conn).await?;
    state.metrics.add("gateway_syncs", 1);
    Ok(axum::Json(SyncResponse { server_time, subjects: answers }))
}

async fn sync_subject(state: &AppState, node: &str, s: &SubjectSync) -> ApiResult<SubjectOutcome> {
    let customer_id = {
        let mut conn = state.db.pool().acquire().await?;
        customers::by_subject(&mut conn, &s.subject).await?
    };
    let Some(customer_id) = customer_id else {
        return Ok(SubjectOutcome::UnknownSubject);
    };
    let mut ctx = match CustomerTx::begin(&state.db, &customer_id).await {
        Ok(ctx) => ctx,
        // Deleted between the lookup and the lock.
        Err(p) if p.status == axum::http::StatusCode::NOT_FOUND => return Ok(SubjectOutcome::UnknownSubject),
        Err(p) => return Err(p),
    };
    let now = ctx.now;
    let mut usage_outcome = None;
    if let Some(range) = &s.usage {
        let key = range.key(node, &s.subject);
        let record = UsageRecord {
            key: &key,
            customer_id: &customer_id,
            node,
            subject: &s.subject,
            currency: s.currency,
            feature: s.feature_key.as_ref(),
            range,
        };
        if usage::record(&mut ctx.w.tx, &record, now).await? {
            if range.amount.is_positive() {
                let spend = Spend {
                    currency: s.currency,
                    amount: range.amount,
                    feature: s.feature_key.clone(),
                    mode: range.settlement_mode,
                };
                let outcome = ctx.book().book_usage(&spend, now);
                let labels = Labels::from([
                    ("node".to_owned(), label_safe(node)),
                    ("calls".to_owned(), range.calls().to_string()),
                ]);
                let op = Operation {
                    reference: format!("usage:{key}"),
                    name: "Gateway usage",
                    description: None,
                    labels: &labels,
                };
                ctx.save(&outcome.entries, &op, &state.metrics).await?;
            }
            state.metrics.add("gateway_usage_calls", range.calls());
            usage_outcome = Some(UsageOutcome::Booked);
        } else {
            usage_outcome = Some(UsageOutcome::Duplicate);
        }
    }
    let scope = s.feature_key.clone().map(FeatureScope::Eq);
    let live = ctx
        .book()
        .balances(now, scope.as_ref())
        .into_iter()
        .find(|b| b.currency == s.currency)
        .map(|b| b.live)
        .unwrap_or_default();
    let revision = ctx.revision;
    ctx.commit().await?;
    Ok(SubjectOutcome::Ok { customer_id, usage: usage_outcome, live, revision })
}

/// Labels admit `[A-Za-z0-9._-]`; anything else in a node name becomes `_`.
fn label_safe(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .take(63)
        .collect();
    s.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned()
}
