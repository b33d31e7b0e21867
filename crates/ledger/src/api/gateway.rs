//! `POST /v3/gateway/sync`: the one round trip a gateway worker makes per tick. It books the
//! usage ranges the worker sends (exactly once per range key) and answers each subject's live
//! balance after the booking.

use axum::extract::State;
use credits::gateway::{self, Facts, LeaseFacts};
use credits::sync::{SubjectAnswer, SubjectOutcome, SubjectSync, SyncRequest, SyncResponse, MAX_SUBJECTS_PER_SYNC};

use super::problem::{ApiResult, Problem};
use super::request::Json;
use super::AppState;
use crate::customer_tx::CustomerTx;
use crate::store::books::Operation;
use crate::store::leases;
use crate::store::usage::{self, UsageRecord};
use crate::store::{customers, Labels};

#[utoipa::path(post, path = "/v3/gateway/sync", request_body(content = serde_json::Value, description = "credits::sync::SyncRequest"),
    responses((status = 200, description = "credits::sync::SyncResponse: one answer per subject, in order"), (status = 400), (status = 401)))]
pub async fn sync(State(state): State<AppState>, Json(req): Json<SyncRequest>) -> ApiResult<axum::Json<SyncResponse>> {
    Ok(axum::Json(serve(&state, &req).await?))
}

/// Serves one sync request: each subject in its own customer transaction. The HTTP handler and
/// the protocol simulator (which runs the ledger in-process) both come through here.
pub async fn serve(state: &AppState, req: &SyncRequest) -> ApiResult<SyncResponse> {
    if req.node.is_empty() || req.node.len() > 128 {
        return Err(Problem::bad_request("node", "node must have 1..128 characters"));
    }
    if req.subjects.len() > MAX_SUBJECTS_PER_SYNC {
        return Err(Problem::bad_request("subjects", format!("at most {MAX_SUBJECTS_PER_SYNC} subjects per sync")));
    }
    let mut answers = Vec::with_capacity(req.subjects.len());
    for s in &req.subjects {
        let outcome = match gateway::invalid(s) {
            Some(reason) => SubjectOutcome::Rejected { reason },
            None => sync_subject(state, &req.node, s).await?,
        };
        answers.push(SubjectAnswer { subject: s.subject.clone(), outcome });
    }
    let mut conn = state.db.pool().acquire().await?;
    let server_time = state.db.now(&mut conn).await?;
    state.metrics.add("gateway_syncs", 1);
    Ok(SyncResponse { server_time, subjects: answers })
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
    let key = s.usage_key(node);
    let facts = Facts {
        usage_seen: match &key {
            Some(key) => usage::exists(&mut ctx.w.tx, key).await?,
            None => false,
        },
        lease: match &s.lease {
            Some(l) => leases::find(&mut ctx.w.tx, &l.lease_id).await?.map(|k| LeaseFacts {
                owned_by_this_customer: k.customer_id == customer_id,
                closed: k.closed,
                last_seq: k.last_seq,
            }),
            None => None,
        },
    };
    let served = gateway::serve(ctx.book(), s, &facts, now);
    if let (Some(range), Some(key)) = (&s.usage, &key) {
        if served.record_usage {
            let record = UsageRecord {
                key,
                customer_id: &customer_id,
                node,
                subject: &s.subject,
                currency: s.currency,
                feature: s.feature_key.as_ref(),
                range,
            };
            usage::record(&mut ctx.w.tx, &record, now).await?;
            state.metrics.add("gateway_usage_calls", range.calls());
        }
    }
    let labels = Labels::from([("node".to_owned(), label_safe(node))]);
    let reference = key.map_or_else(|| "lease".to_owned(), |k| format!("usage:{k}"));
    let op = Operation { reference, name: "Gateway usage", description: None, labels: &labels };
    // Writes the entries and every hold the request changed (holds are not journal entries).
    ctx.save(&served.entries, &op, &state.metrics).await?;
    if let (Some(request), Some(seq)) = (&s.lease, served.lease_seq) {
        leases::set_last_seq(&mut ctx.w.tx, &request.lease_id, seq).await?;
    }
    state.metrics.add("leases_opened", u64::from(served.lease_opened));
    state.metrics.add("leases_released", u64::from(served.lease_released));
    state.metrics.add("leases_expired_unreported", served.expired_unreported as u64);
    let revision = ctx.revision;
    ctx.commit().await?;
    Ok(SubjectOutcome::Ok { customer_id, usage: served.usage, live: served.live, revision, lease: served.lease })
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
