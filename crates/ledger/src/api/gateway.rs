//! `POST /v3/gateway/sync`: the one round trip a gateway worker makes per tick. It books the
//! usage ranges the worker sends (exactly once per range key) and answers each subject's live
//! balance after the booking.

use axum::extract::State;
use credits::sync::{
    LeaseAnswer, LeaseRequest, SubjectAnswer, SubjectOutcome, SubjectSync, SyncRequest, SyncResponse, UsageOutcome,
    MAX_CALLS_PER_RANGE, MAX_SUBJECTS_PER_SYNC,
};
use credits::{Amount, FeatureScope, HoldId, Spend};

use super::problem::{ApiResult, Problem};
use super::request::Json;
use super::AppState;
use crate::customer_tx::CustomerTx;
use crate::store::books::Operation;
use crate::store::leases;
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

fn invalid_lease(l: &LeaseRequest) -> Option<String> {
    if l.lease_id.is_empty() || l.lease_id.len() > 512 {
        return Some("lease_id must have 1..512 characters".into());
    }
    if l.want.is_negative() {
        return Some("a lease cannot want a negative amount".into());
    }
    if !(1..=3_600_000).contains(&l.ttl_ms) {
        return Some("lease ttl_ms must be between 1 and 3600000".into());
    }
    if l.seq > i64::MAX as u64 {
        return Some("lease seq is too large".into());
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
        let outcome = match invalid(s).or_else(|| s.lease.as_ref().and_then(invalid_lease)) {
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
    ctx.close_expired_leases(&state.metrics);
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
                // Usage spent from a lease is captured against it; usage beyond it (or after it
                // closed) is booked all the same.
                let lease = range
                    .lease_id
                    .as_ref()
                    .map(|id| HoldId(id.clone()))
                    .filter(|id| ctx.loaded.book.hold(id).is_some());
                let outcome = match lease {
                    Some(id) => ctx
                        .book()
                        .capture(&id, &spend, now)
                        .map_err(|e| Problem::bad_request("lease_id", e.to_string()))?,
                    None => ctx.book().book_usage(&spend, now),
                };
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
    let lease = match &s.lease {
        Some(request) => match lease(state, &mut ctx, &customer_id, s, request).await? {
            Ok(answer) => Some(answer),
            Err(reason) => return Ok(SubjectOutcome::Rejected { reason }),
        },
        None => None,
    };
    // Writes the holds the lease request changed (no journal entries: holds are not movements).
    let labels = Labels::new();
    ctx.save(&[], &Operation::system("lease", &labels), &state.metrics).await?;
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
    Ok(SubjectOutcome::Ok { customer_id, usage: usage_outcome, live, revision, lease })
}

/// Opens, tops up, renews or releases a node's lease, atomically within the customer's lock: a
/// top-up is carved out of what is live, so all leases together never hold more than that.
async fn lease(
    state: &AppState,
    ctx: &mut CustomerTx,
    customer_id: &str,
    s: &SubjectSync,
    request: &LeaseRequest,
) -> ApiResult<Result<LeaseAnswer, String>> {
    let now = ctx.now;
    let id = HoldId(request.lease_id.clone());
    let ttl = chrono::TimeDelta::milliseconds(i64::try_from(request.ttl_ms).unwrap_or(i64::MAX));
    let expires_at = now + ttl;
    let seq = i64::try_from(request.seq).unwrap_or(i64::MAX);
    let known = leases::find(&mut ctx.w.tx, &request.lease_id).await?;
    let closed = |held: Amount| LeaseAnswer {
        lease_id: request.lease_id.clone(),
        held,
        granted: Amount::ZERO,
        expires_at: now,
        closed: true,
    };
    let open = known.as_ref().is_some_and(|k| !k.closed) && ctx.loaded.book.hold(&id).is_some_and(|h| !h.released);
    match known {
        Some(k) if k.customer_id != customer_id => Ok(Err("lease_id belongs to another customer".into())),
        Some(k) if open => {
            if request.release {
                ctx.book().release_hold(&id).map_err(|e| Problem::bad_request("lease_id", e.to_string()))?;
                state.metrics.add("leases_released", 1);
                return Ok(Ok(closed(Amount::ZERO)));
            }
            let want = if seq > k.last_seq { request.want } else { Amount::ZERO };
            // Also a renewal: the expiry moves forward (extend_hold never shortens it).
            let (granted, _) = ctx
                .book()
                .extend_hold(&id, want, expires_at, now)
                .map_err(|e| Problem::bad_request("lease_id", e.to_string()))?;
            if seq > k.last_seq {
                leases::set_last_seq(&mut ctx.w.tx, &request.lease_id, seq).await?;
            }
            let hold = ctx.loaded.book.hold(&id);
            let (held, expires_at) = hold.map_or((Amount::ZERO, expires_at), |h| (h.amount, h.expires_at));
            Ok(Ok(LeaseAnswer { lease_id: request.lease_id.clone(), held, granted, expires_at, closed: false }))
        }
        _ if request.release => Ok(Ok(closed(Amount::ZERO))),
        // New, or closed before (released or expired): open it, carved out of what is live.
        known => {
            let last_seq = known.map_or(-1, |k| k.last_seq);
            let want = if seq > last_seq { request.want } else { Amount::ZERO };
            let (granted, _) = ctx
                .book()
                .place_hold(id.clone(), s.currency, s.feature_key.clone(), want, expires_at, now)
                .map_err(|e| Problem::bad_request("lease_id", e.to_string()))?;
            ctx.save(&[], &Operation::system("lease", &Labels::new()), &state.metrics).await?;
            leases::set_last_seq(&mut ctx.w.tx, &request.lease_id, seq.max(last_seq)).await?;
            state.metrics.add("leases_opened", 1);
            Ok(Ok(LeaseAnswer {
                lease_id: request.lease_id.clone(),
                held: granted,
                granted,
                expires_at,
                closed: false,
            }))
        }
    }
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
