//! `POST /v3/gateway/sync`: the one round trip a gateway worker makes per tick. It books the
//! usage ranges the worker sends (exactly once per range key), all in one transaction, and
//! answers each subject's live balance after the booking.

use axum::extract::State;
use credits::gateway::{self, Facts, LeaseFacts};
use credits::sync::{SubjectAnswer, SubjectOutcome, SyncRequest, SyncResponse, MAX_SUBJECTS_PER_SYNC};

use super::problem::{ApiResult, Problem};
use super::request::Json;
use super::AppState;
use std::collections::HashMap;

use credits::{Book, HoldId};

use crate::db::lock_customers;
use crate::store::books::{self, Operation, Writes};
use crate::store::leases::{self, LeaseRecord};
use crate::store::usage::{self, UsageRecord};
use crate::store::{customers, Labels};

#[utoipa::path(post, path = "/v3/gateway/sync", request_body(content = serde_json::Value, description = "credits::sync::SyncRequest"),
    responses((status = 200, description = "credits::sync::SyncResponse: one answer per subject, in order"), (status = 400), (status = 401)))]
pub async fn sync(State(state): State<AppState>, Json(req): Json<SyncRequest>) -> ApiResult<axum::Json<SyncResponse>> {
    Ok(axum::Json(serve(&state, &req).await?))
}

/// Serves one sync request in one write transaction. The HTTP handler and
/// the protocol simulator (which runs the ledger in-process) both come through here.
///
/// A sync carries up to a thousand subjects, so it is served set-wise: a few statements read
/// every book, usage key and lease it touches, the credit model decides subject by subject in
/// memory (in request order within each customer), and a few multi-row statements write the
/// result. A failure rolls the whole sync back; the node re-sends it unchanged and every range
/// still books exactly once.
pub async fn serve(state: &AppState, req: &SyncRequest) -> ApiResult<SyncResponse> {
    if req.node.is_empty() || req.node.len() > 128 {
        return Err(Problem::bad_request("node", "node must have 1..128 characters"));
    }
    if req.subjects.len() > MAX_SUBJECTS_PER_SYNC {
        return Err(Problem::bad_request("subjects", format!("at most {MAX_SUBJECTS_PER_SYNC} subjects per sync")));
    }
    let mut outcomes: Vec<Option<SubjectOutcome>> =
        req.subjects.iter().map(|s| gateway::invalid(s).map(|reason| SubjectOutcome::Rejected { reason })).collect();
    let subjects: Vec<String> =
        req.subjects.iter().zip(&outcomes).filter(|(_, o)| o.is_none()).map(|(s, _)| s.subject.clone()).collect();
    let owner_of = {
        let mut conn = state.db.pool().acquire().await?;
        customers::by_subjects(&mut conn, &subjects).await?
    };
    // (customer, subject index), stable-sorted: subjects of one customer keep their request order.
    let mut owners: Vec<(&str, usize)> = Vec::new();
    for (i, s) in req.subjects.iter().enumerate() {
        if outcomes[i].is_none() {
            match owner_of.get(&s.subject) {
                Some(customer_id) => owners.push((customer_id, i)),
                None => outcomes[i] = Some(SubjectOutcome::UnknownSubject),
            }
        }
    }
    owners.sort_by(|a, b| a.0.cmp(b.0));
    let mut customer_ids: Vec<String> = owners.iter().map(|(c, _)| (*c).to_owned()).collect();
    customer_ids.dedup();

    let mut w = state.db.begin_write().await?;
    let revisions = lock_customers(&mut w.tx, state.db.backend(), &customer_ids).await?;
    let db_now = state.db.now(&mut w.tx).await?;
    let mut books = books::load_many(&mut w.tx, &customer_ids).await?;
    let keys: Vec<String> = owners.iter().filter_map(|&(_, i)| req.subjects[i].usage_key(&req.node)).collect();
    let mut recorded = usage::recorded(&mut w.tx, &keys).await?;
    let lease_ids: Vec<String> =
        owners.iter().filter_map(|&(_, i)| req.subjects[i].lease.as_ref().map(|l| l.lease_id.clone())).collect();
    let mut leases = leases::find_many(&mut w.tx, &lease_ids).await?;

    let labels = Labels::from([("node".to_owned(), label_safe(&req.node))]);
    let mut writes = Writes::new();
    let mut counts = Counts::default();
    let mut before: HashMap<&str, Book> = HashMap::new();
    for &(customer_id, i) in &owners {
        // Deleted between the lookup and the lock: no revision, no book.
        let (Some(&revision), Some(loaded)) = (revisions.get(customer_id), books.get_mut(customer_id)) else {
            outcomes[i] = Some(SubjectOutcome::UnknownSubject);
            continue;
        };
        let book = &mut loaded.book;
        before.entry(customer_id).or_insert_with(|| book.clone());
        // The database clock, never behind the book's own clock.
        let now = db_now.max(book.clock());
        let s = &req.subjects[i];
        let key = s.usage_key(&req.node);
        let facts = Facts {
            usage_seen: key.as_ref().is_some_and(|k| recorded.contains(k)),
            lease: s.lease.as_ref().and_then(|l| leases.get(&l.lease_id)).map(|k| LeaseFacts {
                owned_by_this_customer: k.customer_id == customer_id,
                closed: k.closed,
                last_seq: k.last_seq,
            }),
        };
        let served = gateway::serve(book, s, &facts, now);
        if let (Some(range), Some(key)) = (&s.usage, &key) {
            if served.record_usage {
                let record = UsageRecord {
                    key,
                    customer_id,
                    node: &req.node,
                    subject: &s.subject,
                    currency: s.currency,
                    feature: s.feature_key.as_ref(),
                    range,
                };
                writes.usage(&record, now);
                recorded.insert(key.clone());
                counts.usage_calls += range.calls();
            }
        }
        let reference = key.map_or_else(|| "lease".to_owned(), |k| format!("usage:{k}"));
        let op = Operation { reference, name: "Gateway usage", description: None, labels: &labels };
        writes.entries(customer_id, &served.entries, &op, now);
        state.metrics.count_entries(&served.entries);
        if let Some(request) = &s.lease {
            // What a later subject of this sync must know about the lease.
            let hold = book.hold(&HoldId(request.lease_id.clone()));
            let known = leases.get(&request.lease_id);
            if known.is_none_or(|k| k.customer_id == customer_id) && (hold.is_some() || known.is_some()) {
                let last_seq = served.lease_seq.or(known.map(|k| k.last_seq)).unwrap_or(0);
                let closed = hold.is_none_or(|h| h.released);
                leases.insert(
                    request.lease_id.clone(),
                    LeaseRecord { customer_id: customer_id.to_owned(), closed, last_seq },
                );
            }
            if let Some(seq) = served.lease_seq {
                writes.lease_seq(&request.lease_id, seq);
            }
        }
        counts.leases_opened += u64::from(served.lease_opened);
        counts.leases_released += u64::from(served.lease_released);
        counts.leases_expired_unreported += served.expired_unreported as u64;
        outcomes[i] = Some(SubjectOutcome::Ok {
            customer_id: customer_id.to_owned(),
            usage: served.usage,
            live: served.live,
            revision,
            lease: served.lease,
        });
    }
    for (customer_id, before) in &before {
        if let Some(loaded) = books.get(*customer_id) {
            let now = db_now.max(before.clock());
            writes.changes(customer_id, before, &loaded.book, now);
        }
    }
    writes.flush(&mut w.tx).await?;
    let touched: Vec<(&str, &Book)> =
        before.keys().filter_map(|c| books.get(*c).map(|loaded| (*c, &loaded.book))).collect();
    counts.notification_events = crate::notify::on_bookings(&mut w.tx, &touched, db_now).await?;
    let server_time = state.db.now(&mut w.tx).await?;
    w.commit().await?;
    counts.publish(state);
    let subjects = req
        .subjects
        .iter()
        .zip(outcomes)
        .map(|(s, outcome)| SubjectAnswer {
            subject: s.subject.clone(),
            // Every slot was filled above.
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
    notification_events: usize,
}

impl Counts {
    fn publish(&self, state: &AppState) {
        state.metrics.add("gateway_usage_calls", self.usage_calls);
        state.metrics.add("leases_opened", self.leases_opened);
        state.metrics.add("leases_released", self.leases_released);
        state.metrics.add("leases_expired_unreported", self.leases_expired_unreported);
        state.metrics.add("gateway_syncs", 1);
        state.metrics.add("notification_events", self.notification_events as u64);
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
