//! `POST /v3/gateway/sync`: the one round trip a gateway worker makes per tick. It books the
//! usage ranges the worker sends (exactly once per range key), all in one transaction, and
//! answers each subject's live balance after the booking.

use axum::extract::State;
use credits::gateway::{self, Facts, LeaseFacts};
use credits::sync::{SubjectAnswer, SubjectOutcome, SubjectSync, SyncRequest, SyncResponse, MAX_SUBJECTS_PER_SYNC};

use super::problem::{ApiResult, Problem};
use super::request::Json;
use super::AppState;
use crate::customer_tx::CustomerTx;
use crate::db::WriteTx;
use crate::store::books::Operation;
use crate::store::leases;
use crate::store::usage::{self, UsageRecord};
use crate::store::{customers, Labels};

#[utoipa::path(post, path = "/v3/gateway/sync", request_body(content = serde_json::Value, description = "credits::sync::SyncRequest"),
    responses((status = 200, description = "credits::sync::SyncResponse: one answer per subject, in order"), (status = 400), (status = 401)))]
pub async fn sync(State(state): State<AppState>, Json(req): Json<SyncRequest>) -> ApiResult<axum::Json<SyncResponse>> {
    Ok(axum::Json(serve(&state, &req).await?))
}

/// Serves one sync request in one write transaction. The HTTP handler and
/// the protocol simulator (which runs the ledger in-process) both come through here.
pub async fn serve(state: &AppState, req: &SyncRequest) -> ApiResult<SyncResponse> {
    if req.node.is_empty() || req.node.len() > 128 {
        return Err(Problem::bad_request("node", "node must have 1..128 characters"));
    }
    if req.subjects.len() > MAX_SUBJECTS_PER_SYNC {
        return Err(Problem::bad_request("subjects", format!("at most {MAX_SUBJECTS_PER_SYNC} subjects per sync")));
    }
    // Resolve every subject first, then book them all in one write transaction (one commit per
    // sync, not per subject), locking customers in id order so that concurrent syncs of other
    // nodes cannot deadlock. A failure rolls the whole sync back; the node re-sends it unchanged
    // and every range still books exactly once.
    let mut outcomes: Vec<Option<SubjectOutcome>> = Vec::with_capacity(req.subjects.len());
    let mut owners: Vec<(String, usize)> = Vec::new();
    {
        let mut conn = state.db.pool().acquire().await?;
        for (i, s) in req.subjects.iter().enumerate() {
            if let Some(reason) = gateway::invalid(s) {
                outcomes.push(Some(SubjectOutcome::Rejected { reason }));
            } else if let Some(customer_id) = customers::by_subject(&mut conn, &s.subject).await? {
                outcomes.push(None);
                owners.push((customer_id, i));
            } else {
                outcomes.push(Some(SubjectOutcome::UnknownSubject));
            }
        }
    }
    // Stable: subjects of one customer keep their request order.
    owners.sort_by(|a, b| a.0.cmp(&b.0));
    let mut w = state.db.begin_write().await?;
    let mut counts = Counts::default();
    for (customer_id, i) in owners {
        let (outcome, back) = sync_subject(state, w, &req.node, &req.subjects[i], customer_id, &mut counts).await?;
        outcomes[i] = Some(outcome);
        w = back;
    }
    let server_time = state.db.now(&mut w.tx).await?;
    w.commit().await?;
    counts.publish(state);
    let subjects = req
        .subjects
        .iter()
        .zip(outcomes)
        .map(|(s, outcome)| SubjectAnswer {
            subject: s.subject.clone(),
            // Every slot was filled above; a deleted customer answers as unknown.
            outcome: outcome.unwrap_or(SubjectOutcome::UnknownSubject),
        })
        .collect();
    Ok(SyncResponse { server_time, subjects })
}

/// What a sync booked, published to the metrics once it is committed.
#[derive(Default)]
struct Counts {
    usage_calls: u64,
    leases_opened: u64,
    leases_released: u64,
    leases_expired_unreported: u64,
}

impl Counts {
    fn publish(&self, state: &AppState) {
        state.metrics.add("gateway_usage_calls", self.usage_calls);
        state.metrics.add("leases_opened", self.leases_opened);
        state.metrics.add("leases_released", self.leases_released);
        state.metrics.add("leases_expired_unreported", self.leases_expired_unreported);
        state.metrics.add("gateway_syncs", 1);
    }
}

/// Serves one subject within the sync's transaction and hands the transaction back.
async fn sync_subject(
    state: &AppState,
    w: WriteTx,
    node: &str,
    s: &SubjectSync,
    customer_id: String,
    counts: &mut Counts,
) -> ApiResult<(SubjectOutcome, WriteTx)> {
    let mut ctx = match CustomerTx::lock(&state.db, w, &customer_id).await? {
        Ok(ctx) => ctx,
        // Deleted between the lookup and the lock.
        Err(w) => return Ok((SubjectOutcome::UnknownSubject, w)),
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
            counts.usage_calls += range.calls();
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
    counts.leases_opened += u64::from(served.lease_opened);
    counts.leases_released += u64::from(served.lease_released);
    counts.leases_expired_unreported += served.expired_unreported as u64;
    let revision = ctx.revision;
    let outcome =
        SubjectOutcome::Ok { customer_id, usage: served.usage, live: served.live, revision, lease: served.lease };
    Ok((outcome, ctx.into_write()))
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
