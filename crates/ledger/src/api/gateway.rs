//! `POST /v3/gateway/sync`: the one round trip a gateway worker makes per tick. It books the
//! usage ranges the worker sends (exactly once per range), in one transaction shared with the
//! other syncs that waited for it (two at once on PostgreSQL, see [`serve_group`]), and answers
//! each subject's live balance after the booking.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use credits::gateway::{self, Facts, LeaseFacts, Served};
use credits::limits::{MAX_NODE_LEN, MAX_SUBJECTS_PER_SYNC};
use credits::sync::{LeaseRequest, SubjectAnswer, SubjectOutcome, SyncRequest, SyncResponse};

use super::problem::{ApiResult, Problem};
use super::request::Json;
use super::AppState;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::oneshot;

use credits::usage_mark::{Check, UsageMark};
use credits::{Book, Entry, Grant, GrantId, GrantState, HoldId, MovementKind};

use crate::book_cache::Marks;
use crate::db::{lock_customers, Backend, WriteTx};
use crate::store::books::{self, Operation, Writes};
use crate::store::grants::GrantRecord;
use crate::store::leases::{self, LeaseRecord};
use crate::store::usage::{self, UsageRecord};
use crate::store::{customers, new_id, Labels};

#[utoipa::path(post, path = "/v3/gateway/sync", request_body(content = serde_json::Value, description = "credits::sync::SyncRequest"),
    responses((status = 200, description = "credits::sync::SyncResponse: one answer per subject, in order"), (status = 400), (status = 401)))]
pub async fn sync(State(state): State<AppState>, Json(req): Json<SyncRequest>) -> ApiResult<axum::Json<SyncResponse>> {
    Ok(axum::Json(serve(&state, req).await?))
}

/// Serves one sync request. The HTTP handler and the protocol simulator (which runs the ledger
/// in-process) both come through here.
///
/// Syncs that arrive while others are being served wait in [`SyncQueue`] and are then served
/// together, in one write transaction and one durable commit: a node's cold read (a sync of one
/// subject that opens a lease) costs a commit of its own otherwise, and SQLite commits one at a
/// time. Each sync is answered as if served alone after the ones before it in the group.
pub async fn serve(state: &AppState, req: SyncRequest) -> ApiResult<SyncResponse> {
    validate(&req)?;
    let (answer, answered) = oneshot::channel();
    if state.syncs.push(Job { req, answer }) {
        // Spawned, not awaited here: a client that goes away must not stop the syncs of others.
        tokio::spawn(serve_queue(state.clone()));
    }
    // The serving task ended without answering (it panicked): its transaction was rolled back.
    answered.await.unwrap_or_else(|_| Err(Problem::new(StatusCode::INTERNAL_SERVER_ERROR, INTERRUPTED)))
}

fn validate(req: &SyncRequest) -> ApiResult<()> {
    // A node numbers the calls of ranges that name no origin, and its id opens their keys
    // (`<node>/<subject>/…`): with a '/' in it, two streams could share one key.
    if req.node.is_empty() || req.node.len() > MAX_NODE_LEN || req.node.contains('/') {
        return Err(Problem::bad_request("node", format!("node must have 1..{MAX_NODE_LEN} characters and no '/'")));
    }
    if req.subjects.len() > MAX_SUBJECTS_PER_SYNC {
        return Err(Problem::bad_request("subjects", format!("at most {MAX_SUBJECTS_PER_SYNC} subjects per sync")));
    }
    Ok(())
}

const INTERRUPTED: &str = "the ledger could not complete the sync; nothing was booked";

/// A sync waiting to be served, and where its answer goes.
struct Job {
    req: SyncRequest,
    answer: oneshot::Sender<ApiResult<SyncResponse>>,
}

/// A group carries whole syncs, at least one, up to as many subjects as the last group's pace
/// serves within the queue's budget ([`SyncQueue::new`]), never fewer than this when they wait…
const MIN_GROUP_SUBJECTS: usize = 4 * MAX_SUBJECTS_PER_SYNC;
/// …and never more than this (what one transaction and its answers hold in memory).
const MAX_GROUP_SUBJECTS: usize = 64 * MAX_SUBJECTS_PER_SYNC;

/// How long a group may take by default (`--sync-group-ms`): a gateway's default
/// `ledger.timeout_ms`. Groups that large come only when more waits than they carry, and then
/// larger groups answer every waiting sync sooner, not later (bench/RESULTS.md §0za: 500 ms
/// booked a fifth fewer ranges a second than 1,000 ms, with a p99 half a second longer).
pub const DEFAULT_GROUP_MS: u64 = 1000;

/// Syncs waiting for the one task that serves them, group after group.
///
/// Why groups grow with the load: a group's commit writes every page its ranges dirtied, and
/// with customers spread over the books most pages are dirtied by a few ranges whatever the
/// group's size, while a customer's ranges in one group fold into one movement. With 32 nodes
/// keeping the ledger busy, groups as large as a second allows booked 1.7–1.8× the ranges per
/// second of groups of four, and answered sooner (bench/RESULTS.md §0za). What bounds them is the
/// time one takes: on SQLite every other write waits for it, on PostgreSQL every write to its
/// customers.
pub struct SyncQueue {
    state: Mutex<QueueState>,
    budget: Duration,
}

impl Default for SyncQueue {
    fn default() -> Self {
        Self::new(Duration::from_millis(DEFAULT_GROUP_MS))
    }
}

struct QueueState {
    jobs: VecDeque<Job>,
    /// A task is serving the queue.
    serving: bool,
    /// Syncs in the group being served.
    in_service: usize,
    /// The most subjects the next group carries.
    cap: usize,
}

impl SyncQueue {
    /// A queue whose groups take about `budget` each when the load fills them.
    pub fn new(budget: Duration) -> Self {
        let state = QueueState { jobs: VecDeque::new(), serving: false, in_service: 0, cap: MIN_GROUP_SUBJECTS };
        SyncQueue { state: Mutex::new(state), budget }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Syncs waiting for a group.
    pub fn waiting(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Syncs in the group being served.
    pub fn in_service(&self) -> usize {
        self.lock().in_service
    }

    /// Queues `job`; `true` if no task serves the queue (the caller starts one).
    fn push(&self, job: Job) -> bool {
        let mut q = self.lock();
        q.jobs.push_back(job);
        !std::mem::replace(&mut q.serving, true)
    }

    /// The next group: whole syncs in arrival order, up to the cap's subjects. Empty when nothing
    /// waits, and then the serving task is done.
    fn next_group(&self) -> Vec<Job> {
        let mut q = self.lock();
        let mut group = Vec::new();
        let mut subjects = 0usize;
        while let Some(job) = q.jobs.front() {
            subjects = subjects.saturating_add(job.req.subjects.len());
            if !group.is_empty() && subjects > q.cap {
                break;
            }
            group.extend(q.jobs.pop_front());
        }
        q.serving = !group.is_empty();
        q.in_service = group.len();
        group
    }

    /// A group of `subjects` took `took`: the next may carry as many as fit in the budget at that
    /// pace.
    fn served(&self, subjects: usize, took: Duration) {
        self.lock().cap = group_cap(self.budget, subjects, took);
    }
}

/// The subjects that fit in `budget` at the pace of a group of `subjects` that took `took`, at
/// most twice that group's (a pace measured on a smaller group is not trusted far beyond it),
/// within [`MIN_GROUP_SUBJECTS`]..=[`MAX_GROUP_SUBJECTS`].
fn group_cap(budget: Duration, subjects: usize, took: Duration) -> usize {
    let per_subject = took.as_secs_f64() / subjects.max(1) as f64;
    let fits = if per_subject > 0.0 { budget.as_secs_f64() / per_subject } else { f64::INFINITY };
    // Float to integer saturates; the clamp bounds it either way.
    (fits as usize).min(subjects.saturating_mul(2)).clamp(MIN_GROUP_SUBJECTS, MAX_GROUP_SUBJECTS)
}

/// Ends a serving task: if it panics, the syncs it has not taken are dropped (their callers answer
/// 500 and the nodes re-send them) and the next sync starts a new task.
struct Serving<'a>(&'a SyncQueue);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut q = self.0.lock();
            q.jobs.clear();
            q.serving = false;
            q.in_service = 0;
        }
    }
}

async fn serve_queue(state: AppState) {
    let _serving = Serving(&state.syncs);
    loop {
        let group = state.syncs.next_group();
        if group.is_empty() {
            return;
        }
        let reqs: Vec<&SyncRequest> = group.iter().map(|job| &job.req).collect();
        let started = Instant::now();
        // A caller that went away has nobody to answer; what it sent is booked all the same.
        let served = serve_group(&state, &reqs).await;
        state.syncs.served(reqs.iter().map(|r| r.subjects.len()).sum(), started.elapsed());
        match served {
            Ok(responses) => {
                for (job, response) in group.into_iter().zip(responses) {
                    let _ = job.answer.send(Ok(response));
                }
            }
            Err(problem) => {
                // One sync the database refuses must not fail the syncs that happened to wait
                // beside it (its node re-sends it, and it would fail their groups again): each is
                // served again on its own, in order, and answered with its own result.
                let alone = group.len() == 1;
                if !alone {
                    tracing::warn!(syncs = group.len(), error = %problem.detail, "a sync group failed; serving its syncs one by one");
                }
                for job in group {
                    let answer = if alone {
                        Err(problem.clone())
                    } else {
                        serve_group(&state, &[&job.req]).await.map(|mut responses| responses.remove(0))
                    };
                    let _ = job.answer.send(answer);
                }
            }
        }
    }
}

/// Serves the syncs `reqs`: a few statements read every book, usage key and lease they touch,
/// the credit model decides subject by subject in memory (per customer in the order the subjects
/// came: sync by sync, then request order), and a few multi-row statements write the result. A
/// customer's usage in one transaction is one movement per grant ([`Batch::book`]).
///
/// On SQLite the group is one write transaction. On PostgreSQL it is split by customer into up to
/// [`PG_SHARDS`] transactions that run at once: their customers are disjoint, so they never wait
/// on each other's row locks, and PostgreSQL works on them in parallel (served as one
/// transaction, a group kept one PostgreSQL backend busy while the rest of the machine idled).
///
/// A failure fails the whole group (and [`serve_queue`] serves its syncs again one by one); a
/// shard that committed before another failed is then served again too, which the protocol makes
/// harmless exactly as for a node that re-sends a sync whose answer it lost: every range still
/// books exactly once and every lease request applies once.
async fn serve_group(state: &AppState, reqs: &[&SyncRequest]) -> ApiResult<Vec<SyncResponse>> {
    let mut outcomes: Vec<Vec<Option<SubjectOutcome>>> = reqs
        .iter()
        .map(|req| {
            req.subjects.iter().map(|s| gateway::invalid(s).map(|reason| SubjectOutcome::Rejected { reason })).collect()
        })
        .collect();
    let owner_of = owners(state, reqs, &mut outcomes).await?;
    let owners: Vec<(&str, At)> = owner_of.iter().map(|(c, at)| (c.as_str(), *at)).collect();
    let max_shards = match state.db.backend() {
        // One writer at a time.
        Backend::Sqlite => 1,
        Backend::Postgres => PG_SHARDS,
    };
    let shards = shards(&owners, max_shards);
    // Every transaction runs to its end (commit or rollback) before the group is answered: one
    // that fails does not cut the others short, so what committed is known and counted.
    let served = join_all(shards.into_iter().map(|shard| serve_shard(state, reqs, shard))).await;
    let mut server_time = DateTime::<Utc>::MIN_UTC;
    for shard in served {
        let shard = shard?;
        server_time = server_time.max(shard.server_time);
        for (at, outcome) in shard.outcomes {
            outcomes[at.sync][at.subject] = Some(outcome);
        }
    }
    if server_time == DateTime::<Utc>::MIN_UTC {
        // No subject had a customer: nothing was written, but the answer carries the clock.
        let mut conn = state.db.pool().acquire().await?;
        server_time = state.db.now(&mut conn).await?;
    }
    state.metrics.add("gateway_syncs", reqs.len() as u64);
    // Subjects, renewals included: what the gateways' syncs cost the ledger, whatever they carried.
    state.metrics.add("gateway_sync_subjects", reqs.iter().map(|r| r.subjects.len() as u64).sum());
    let responses = reqs
        .iter()
        .zip(outcomes)
        .map(|(req, outcomes)| SyncResponse {
            server_time,
            subjects: req
                .subjects
                .iter()
                .zip(outcomes)
                .map(|(s, outcome)| SubjectAnswer {
                    subject: s.subject.clone(),
                    // Every slot was filled above.
                    outcome: outcome.unwrap_or(SubjectOutcome::UnknownSubject),
                })
                .collect(),
        })
        .collect();
    Ok(responses)
}

/// The most transactions one group is split into on PostgreSQL (on 2 cores, 4 did no better than
/// 2: bench/RESULTS.md §0e).
const PG_SHARDS: usize = 2;

/// The fewest subjects worth a transaction of their own: each costs a commit.
const MIN_SHARD_SUBJECTS: usize = 500;

/// `owners` (sorted by customer) cut into up to `max` runs of about equal numbers of subjects,
/// never through a customer: a customer's subjects stay in one shard, in their order. None if
/// there are no owners.
fn shards<'o, 'c>(owners: &'o [(&'c str, At)], max: usize) -> Vec<&'o [(&'c str, At)]> {
    let count = (owners.len() / MIN_SHARD_SUBJECTS).clamp(1, max.max(1));
    let mut shards = Vec::with_capacity(count);
    let mut rest = owners;
    for left in (1..=count).rev() {
        let mut cut = rest.len().div_ceil(left).min(rest.len());
        // Moved past the subjects of the customer it falls within.
        while let (Some(last), Some(next)) = (cut.checked_sub(1).and_then(|i| rest.get(i)), rest.get(cut)) {
            if last.0 != next.0 {
                break;
            }
            cut = cut.saturating_add(1);
        }
        let (shard, tail) = rest.split_at(cut);
        if !shard.is_empty() {
            shards.push(shard);
        }
        rest = tail;
    }
    shards
}

/// What one transaction of a group answered, and when.
struct ShardServed {
    outcomes: Vec<(At, SubjectOutcome)>,
    server_time: DateTime<Utc>,
}

/// Serves the subjects `owners` (sorted by customer) of the syncs `reqs` in one write
/// transaction, and publishes what it booked once committed.
async fn serve_shard(state: &AppState, reqs: &[&SyncRequest], owners: &[(&str, At)]) -> ApiResult<ShardServed> {
    let mut customer_ids: Vec<String> = owners.iter().map(|(c, _)| (*c).to_owned()).collect();
    customer_ids.dedup();
    let mut outcomes = Vec::with_capacity(owners.len());
    let mut w = state.db.begin_write().await?;
    let revisions = lock_customers(&mut w.tx, state.db.backend(), &customer_ids).await?;
    // Books (and marks) this ledger committed and nobody changed since are not read again.
    let (kept, to_read) = state.books.take_current(&customer_ids, &revisions);
    let mut books = HashMap::with_capacity(customer_ids.len());
    let mut kept_marks = HashMap::with_capacity(kept.len());
    for (customer_id, k) in kept {
        books.insert(customer_id.clone(), k.book);
        kept_marks.insert(customer_id, k.marks);
    }
    books.extend(books::load_books(&mut w.tx, &to_read).await?);
    let mut batch = Batch::read(state, &mut w, reqs, owners, kept_marks).await?;
    batch.counts.books_read = to_read.len() as u64;
    let mut before: HashMap<&str, Book> = HashMap::new();
    for &(customer_id, at) in owners {
        // Deleted between the lookup and the lock: no revision, no book.
        let (Some(&revision), Some(book)) = (revisions.get(customer_id), books.get_mut(customer_id)) else {
            outcomes.push((at, SubjectOutcome::UnknownSubject));
            continue;
        };
        before.entry(customer_id).or_insert_with(|| book.clone());
        outcomes.push((at, batch.serve_subject(state, book, customer_id, revision, at)));
    }
    batch.write_booked();
    for (customer_id, before) in &before {
        if let Some(book) = books.get(*customer_id) {
            let now = batch.db_now.max(before.clock());
            batch.writes.changes(customer_id, before, book, now);
        }
    }
    batch.writes.revisions(revisions.clone());
    std::mem::take(&mut batch.writes).flush(&mut w.tx).await?;
    let touched: Vec<(&str, &Book)> = before.keys().filter_map(|c| books.get(*c).map(|book| (*c, book))).collect();
    batch.counts.notification_events = crate::notify::on_bookings(&mut w.tx, &touched, batch.db_now).await?;
    let server_time = state.db.now(&mut w.tx).await?;
    w.commit().await?;
    // Each book served was written with its new revision (`Writes::revisions`), and each mark met
    // is stored as it is now.
    let kept = before.keys().filter(|c| !batch.refunded.contains(**c));
    state.books.keep(kept.filter_map(|c| {
        Some((*c, *revisions.get(*c)?, books.remove(*c)?, batch.marks.remove(*c).unwrap_or_default()))
    }));
    batch.counts.publish(state);
    Ok(ShardServed { outcomes, server_time })
}

/// Where a subject is in a group: its sync, and its place in that sync's request.
#[derive(Clone, Copy, Debug)]
struct At {
    sync: usize,
    subject: usize,
}

/// The customer of each valid subject of the group, stable-sorted by customer: subjects of one
/// customer keep their order (sync by sync, then request order). Subjects nobody has are
/// answered here.
async fn owners(
    state: &AppState,
    reqs: &[&SyncRequest],
    outcomes: &mut [Vec<Option<SubjectOutcome>>],
) -> ApiResult<Vec<(String, At)>> {
    let mut subjects: Vec<String> = reqs
        .iter()
        .zip(outcomes.iter())
        .flat_map(|(req, o)| req.subjects.iter().zip(o).filter(|(_, o)| o.is_none()).map(|(s, _)| s.subject.clone()))
        .collect();
    subjects.sort_unstable();
    subjects.dedup();
    let owner_of = {
        let mut conn = state.db.pool().acquire().await?;
        customers::by_subjects(&mut conn, &subjects).await?
    };
    let mut owners = Vec::new();
    for (sync, req) in reqs.iter().enumerate() {
        for (subject, s) in req.subjects.iter().enumerate() {
            let outcome = &mut outcomes[sync][subject];
            if outcome.is_none() {
                match owner_of.get(&s.subject) {
                    Some(customer_id) => owners.push((customer_id.clone(), At { sync, subject })),
                    None => *outcome = Some(SubjectOutcome::UnknownSubject),
                }
            }
        }
    }
    owners.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(owners)
}

/// One group being served: what it read up front (usage marks and keys, leases) and what it will
/// write, gathered subject by subject.
struct Batch<'a> {
    reqs: &'a [&'a SyncRequest],
    /// The journal labels of each sync's bookings (its node).
    labels: Vec<Labels>,
    /// The database clock of the transaction.
    db_now: DateTime<Utc>,
    /// The usage stream of each subject served (`SubjectSync::usage_stream`), by sync and place
    /// in it: formatted once, and taken by the subject's serving.
    streams: Vec<Vec<Option<String>>>,
    /// Stored marks by customer and stream: those kept with the customers' books, and those of
    /// the group's other streams; moved as ranges are booked, and joined by the streams whose
    /// first range this group books.
    marks: HashMap<String, Marks>,
    /// Range keys stored (before, or by this group) among those the marks cannot vouch for.
    recorded: HashSet<String>,
    leases: HashMap<String, LeaseRecord>,
    /// The customer whose subjects are being served, and the entries they booked so far.
    booking: Option<(String, Vec<Booked>)>,
    /// Customers given credit back by this group: their books hold a grant without its sequence
    /// number (`Writes::new_grant`), so they are not kept for the next group.
    refunded: HashSet<String>,
    writes: Writes,
    counts: Counts,
}

/// A journal entry a subject booked, not yet written: the usage of a customer's next subjects may
/// still fold into it ([`Entry::absorb`]), so that a transaction books one movement per grant and
/// customer however many nodes' ranges it serves.
struct Booked {
    entry: Entry,
    /// `usage:<key>` of the first range it books (`lease` if none).
    reference: String,
    /// The sync whose labels it carries; `None` once it books ranges of syncs labelled apart
    /// (several nodes): then it carries none.
    labels_of: Option<usize>,
    now: DateTime<Utc>,
}

impl<'a> Batch<'a> {
    async fn read(
        state: &AppState,
        w: &mut WriteTx,
        reqs: &'a [&'a SyncRequest],
        owners: &[(&str, At)],
        mut marks: HashMap<String, Marks>,
    ) -> ApiResult<Self> {
        let db_now = state.db.now(&mut w.tx).await?;
        let subject = |at: At| &reqs[at.sync].subjects[at.subject];
        let mut streams: Vec<Vec<Option<String>>> = reqs.iter().map(|r| vec![None; r.subjects.len()]).collect();
        for &(_, at) in owners {
            streams[at.sync][at.subject] = subject(at).usage_stream(&reqs[at.sync].node);
        }
        // The streams whose marks were not kept with their customer's book, with that customer.
        let mut wanted: Vec<(&str, &str)> = owners
            .iter()
            .filter_map(|&(customer_id, at)| {
                let stream = streams[at.sync][at.subject].as_deref()?;
                let kept = marks.get(customer_id).is_some_and(|m| m.contains_key(stream));
                (!kept).then_some((stream, customer_id))
            })
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let read: Vec<&str> = wanted.iter().map(|(stream, _)| *stream).collect();
        let marks_read = read.len() as u64;
        let mut stored = usage::marks(&mut w.tx, &read).await?;
        for (stream, customer_id) in &wanted {
            if let Some((stream, mark)) = stored.remove_entry(*stream) {
                put_mark(&mut marks, customer_id, stream, mark);
            }
        }
        let mark_of = |customer_id: &str, stream: &str| {
            marks.get(customer_id).and_then(|m| m.get(stream)).copied().unwrap_or_default()
        };
        // Only keys the stored marks cannot vouch for: a stream stores keys only once keyed, and
        // then every range not below its mark is checked by key, so none stored is missed; keys
        // this group stores are added as it goes.
        let keys: Vec<String> = owners
            .iter()
            .filter_map(|&(customer_id, at)| {
                let (range, stream) = (subject(at).usage.as_ref()?, streams[at.sync][at.subject].as_ref()?);
                (mark_of(customer_id, stream).check(range) == Check::ByKey).then(|| range.key_in(stream))
            })
            .collect();
        let recorded = usage::recorded(&mut w.tx, &keys).await?;
        let lease_ids: Vec<String> =
            owners.iter().filter_map(|&(_, at)| subject(at).lease.as_ref().map(|l| l.lease_id.clone())).collect();
        let leases = leases::find_many(&mut w.tx, &lease_ids).await?;
        let labels = reqs.iter().map(|req| Labels::from([("node".to_owned(), label_safe(&req.node))])).collect();
        Ok(Batch {
            reqs,
            labels,
            db_now,
            streams,
            marks,
            recorded,
            leases,
            booking: None,
            refunded: HashSet::new(),
            writes: Writes::new(),
            counts: Counts { marks_read, ..Counts::default() },
        })
    }

    /// Adds what the subject of sync `sync` booked for `customer_id`, folding each entry into the
    /// one before it where it continues it. Subjects come customer by customer.
    fn book(&mut self, customer_id: &str, entries: Vec<Entry>, sync: usize, key: Option<&str>, now: DateTime<Utc>) {
        if self.booking.as_ref().is_some_and(|(c, _)| c != customer_id) {
            self.write_booked();
        }
        let (_, booked) = self.booking.get_or_insert_with(|| (customer_id.to_owned(), Vec::new()));
        for entry in entries {
            if let Some(last) = booked.last_mut() {
                if last.entry.absorb(&entry) {
                    if last.labels_of.is_some_and(|l| self.labels[l] != self.labels[sync]) {
                        last.labels_of = None;
                    }
                    continue;
                }
            }
            let reference = key.map_or_else(|| "lease".to_owned(), |k| format!("usage:{k}"));
            booked.push(Booked { entry, reference, labels_of: Some(sync), now });
        }
    }

    /// Writes the entries of the customer served last.
    fn write_booked(&mut self) {
        let Some((customer_id, booked)) = self.booking.take() else { return };
        let unlabelled = Labels::new();
        for b in booked {
            let labels = b.labels_of.map_or(&unlabelled, |sync| &self.labels[sync]);
            // The one adjustment a sync books is credit a range gives back.
            let refund = matches!(&b.entry, Entry::Movement(m) if m.kind == MovementKind::Adjusted);
            let name = if refund { "Gateway refund" } else { "Gateway usage" };
            let op = Operation { reference: b.reference, name, description: None, labels };
            self.writes.entries(&customer_id, std::slice::from_ref(&b.entry), &op, b.now);
        }
    }

    /// Serves the subject `at` on its customer's book and gathers what to write.
    fn serve_subject(
        &mut self,
        state: &AppState,
        book: &mut Book,
        customer_id: &str,
        revision: i64,
        at: At,
    ) -> SubjectOutcome {
        // The database clock, never behind the book's own clock.
        let now = self.db_now.max(book.clock());
        let node = &self.reqs[at.sync].node;
        let s = &self.reqs[at.sync].subjects[at.subject];
        // Each subject is served once: its stream moves to the mark it writes.
        let stream = self.streams[at.sync][at.subject].take();
        let key = s.usage.as_ref().zip(stream.as_deref()).map(|(range, stream)| range.key_in(stream));
        let mut mark = stream.as_ref().and_then(|st| self.marks.get(customer_id)?.get(st)).copied().unwrap_or_default();
        let usage_seen = s.usage.as_ref().is_some_and(|range| match mark.check(range) {
            Check::Booked => true,
            Check::New => false,
            Check::ByKey => key.as_ref().is_some_and(|k| self.recorded.contains(k)),
        });
        let facts = Facts {
            usage_seen,
            lease: s.lease.as_ref().and_then(|l| self.leases.get(&l.lease_id)).map(|k| LeaseFacts {
                owned_by_this_customer: k.customer_id == customer_id,
                closed: k.closed,
                last_seq: k.last_seq,
            }),
            refund_id: s.usage.as_ref().filter(|r| r.refunded.is_positive()).map(|_| GrantId(new_id())),
        };
        // A booking that would overflow the customer's sums rejects this subject only (the book is
        // left as it was); the rest of the batch books.
        let mut served = match gateway::try_serve(book, s, &facts, now) {
            Ok(served) => served,
            Err(e) => return SubjectOutcome::Rejected { reason: e.to_string() },
        };
        if let (Some(range), Some(key), Some(stream)) = (&s.usage, &key, stream) {
            let before = mark;
            if served.record_usage {
                if mark.book(range) {
                    let record = UsageRecord {
                        key,
                        customer_id,
                        node,
                        subject: &s.subject,
                        currency: s.currency,
                        feature: s.feature_key.as_ref(),
                        range,
                    };
                    self.writes.usage(&record, now);
                    self.recorded.insert(key.clone());
                }
                self.counts.usage_calls = self.counts.usage_calls.saturating_add(range.calls());
            } else if usage_seen {
                mark.found(range);
            }
            if mark != before {
                put_mark(&mut self.marks, customer_id, stream.clone(), mark);
                self.writes.usage_mark(stream, customer_id, mark, now);
            }
        }
        if let (Some(grant), Some(key)) = (served.refund.take(), &key) {
            self.writes.new_grant(refund_record(customer_id, grant, key, now));
            self.refunded.insert(customer_id.to_owned());
        }
        state.metrics.count_entries(&served.entries);
        self.book(customer_id, std::mem::take(&mut served.entries), at.sync, key.as_deref(), now);
        if let Some(request) = &s.lease {
            self.remember_lease(book, customer_id, request, served.lease_seq);
        }
        self.counts.add(&served);
        SubjectOutcome::Ok {
            customer_id: customer_id.to_owned(),
            usage: served.usage,
            live: served.live,
            revision,
            lease: served.lease,
        }
    }

    /// What a later subject of this sync must know about the lease, and its new request number.
    fn remember_lease(&mut self, book: &Book, customer_id: &str, request: &LeaseRequest, seq: Option<i64>) {
        let hold = book.hold(&HoldId(request.lease_id.clone()));
        let known = self.leases.get(&request.lease_id);
        if known.is_none_or(|k| k.customer_id == customer_id) && (hold.is_some() || known.is_some()) {
            let last_seq = seq.or(known.map(|k| k.last_seq)).unwrap_or(0);
            let closed = hold.is_none_or(|h| h.released);
            let record = LeaseRecord { customer_id: customer_id.to_owned(), closed, last_seq };
            self.leases.insert(request.lease_id.clone(), record);
        }
        if let Some(seq) = seq {
            self.writes.lease_seq(&request.lease_id, seq);
        }
    }
}

/// Sets a stream's mark among its customer's (a customer's id is copied only for its first).
fn put_mark(marks: &mut HashMap<String, Marks>, customer_id: &str, stream: String, mark: UsageMark) {
    match marks.get_mut(customer_id) {
        Some(of_customer) => {
            of_customer.insert(stream, mark);
        }
        None => {
            marks.insert(customer_id.to_owned(), Marks::from([(stream, mark)]));
        }
    }
}

/// How credit a range gives back shows among the customer's grants: named, and described by the
/// range that carried it. No idempotency key: the range's own (its stream's mark) books it once,
/// and a grant key is the API caller's, at most 256 characters, which a range key may exceed.
fn refund_record(customer_id: &str, grant: Grant, usage_key: &str, now: DateTime<Utc>) -> GrantRecord {
    GrantRecord {
        state: GrantState::new(grant),
        customer_id: customer_id.to_owned(),
        key: None,
        name: "Gateway refund".to_owned(),
        description: Some(format!("credit given back for failed gateway calls, with usage {usage_key}")),
        labels: Labels::new(),
        tax_config: None,
        updated_at: now,
    }
}

/// What a transaction of a group booked, published to the metrics once it is committed.
#[derive(Default)]
struct Counts {
    usage_calls: u64,
    leases_opened: u64,
    leases_released: u64,
    leases_expired_unreported: u64,
    notification_events: usize,
    /// Books read from the store (the others were kept from an earlier sync).
    books_read: u64,
    /// Streams whose marks were looked up in the store (the others were kept with their book).
    marks_read: u64,
}

impl Counts {
    fn add(&mut self, served: &Served) {
        self.leases_opened = self.leases_opened.saturating_add(u64::from(served.lease_opened));
        self.leases_released = self.leases_released.saturating_add(u64::from(served.lease_released));
        let unreported = u64::try_from(served.expired_unreported).unwrap_or(u64::MAX);
        self.leases_expired_unreported = self.leases_expired_unreported.saturating_add(unreported);
    }

    fn publish(&self, state: &AppState) {
        state.metrics.add("gateway_usage_calls", self.usage_calls);
        state.metrics.add("leases_opened", self.leases_opened);
        state.metrics.add("leases_released", self.leases_released);
        state.metrics.add("leases_expired_unreported", self.leases_expired_unreported);
        state.metrics.add("gateway_sync_groups", 1);
        state.metrics.add("notification_events", self.notification_events as u64);
        state.metrics.add("gateway_sync_books_read", self.books_read);
        state.metrics.add("gateway_sync_marks_read", self.marks_read);
    }
}

/// Labels admit `[A-Za-z0-9._-]`; anything else in a node name becomes `_`.
fn label_safe(text: &str) -> String {
    let s: String = text
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' })
        .take(credits::limits::MAX_LABEL_LEN)
        .collect();
    s.trim_matches(|c: char| !c.is_ascii_alphanumeric()).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Shards keep every subject once and in order, never split a customer, and only a group
        /// big enough is split.
        #[test]
        fn shards_cut_between_customers(sizes in proptest::collection::vec(1usize..40, 0..120), max in 1usize..5) {
            let names: Vec<String> = (0..sizes.len()).map(|i| format!("cus_{i:04}")).collect();
            let owners: Vec<(&str, At)> = names
                .iter()
                .zip(&sizes)
                .flat_map(|(c, &n)| (0..n).map(move |subject| (c.as_str(), At { sync: 0, subject })))
                .collect();
            let cut = shards(&owners, max);
            let joined: Vec<(&str, usize)> = cut.iter().flat_map(|s| s.iter().map(|(c, at)| (*c, at.subject))).collect();
            let expected: Vec<(&str, usize)> = owners.iter().map(|(c, at)| (*c, at.subject)).collect();
            prop_assert_eq!(joined, expected);
            prop_assert!(cut.len() <= max.min((owners.len() / MIN_SHARD_SUBJECTS).max(1)));
            prop_assert!(cut.iter().all(|s| !s.is_empty()));
            for pair in cut.windows(2) {
                prop_assert_ne!(pair[0].last().map(|o| o.0), pair[1].first().map(|o| o.0), "a customer was split");
            }
        }
    }

    fn queued(subjects: usize) -> Job {
        let req = SyncRequest {
            node: "node".into(),
            subjects: (0..subjects)
                .map(|i| credits::sync::SubjectSync {
                    subject: format!("s{i}"),
                    currency: "USD".parse().unwrap(),
                    feature_key: None,
                    usage: None,
                    lease: None,
                })
                .collect(),
        };
        Job { req, answer: oneshot::channel().0 }
    }

    #[test]
    fn a_group_takes_whole_syncs_up_to_its_cap_and_at_least_one() {
        let queue = SyncQueue::new(Duration::from_millis(500));
        for _ in 0..40 {
            queue.push(queued(MAX_SUBJECTS_PER_SYNC));
        }
        let sizes = |group: Vec<Job>| group.iter().map(|j| j.req.subjects.len()).collect::<Vec<_>>();
        // Before any group has been timed: four full syncs.
        assert_eq!(sizes(queue.next_group()), vec![MAX_SUBJECTS_PER_SYNC; 4]);
        assert_eq!(queue.in_service(), 4);
        // That group took 100 ms (25 µs a subject): 20,000 would fit in the budget, but the next
        // group at most doubles.
        queue.served(4 * MAX_SUBJECTS_PER_SYNC, Duration::from_millis(100));
        assert_eq!(sizes(queue.next_group()), vec![MAX_SUBJECTS_PER_SYNC; 8]);
        queue.served(8 * MAX_SUBJECTS_PER_SYNC, Duration::from_millis(200));
        assert_eq!(sizes(queue.next_group()), vec![MAX_SUBJECTS_PER_SYNC; 16]);
        queue.served(16 * MAX_SUBJECTS_PER_SYNC, Duration::from_millis(400));
        assert_eq!(sizes(queue.next_group()), vec![MAX_SUBJECTS_PER_SYNC; 12], "20 fit; 12 were left");
        // A slow group brings the cap back down, never below four syncs.
        queue.served(12 * MAX_SUBJECTS_PER_SYNC, Duration::from_secs(3));
        queue.push(queued(10));
        queue.push(queued(MIN_GROUP_SUBJECTS - 10));
        queue.push(queued(1));
        assert_eq!(sizes(queue.next_group()), vec![10, MIN_GROUP_SUBJECTS - 10], "whole syncs, none split");
        assert_eq!(sizes(queue.next_group()), vec![1]);
        assert!(queue.next_group().is_empty());
        assert_eq!(queue.in_service(), 0);
        // One sync is always taken, whatever the cap.
        queue.served(1, Duration::from_secs(60));
        queue.push(queued(MAX_SUBJECTS_PER_SYNC));
        assert_eq!(sizes(queue.next_group()), vec![MAX_SUBJECTS_PER_SYNC]);
    }

    #[test]
    fn a_groups_cap_is_what_fits_in_the_budget_within_its_bounds() {
        let budget = Duration::from_millis(500);
        assert_eq!(group_cap(budget, 16_000, Duration::from_millis(400)), 20_000);
        assert_eq!(group_cap(budget, 4_000, Duration::from_millis(100)), 8_000, "at most twice the group timed");
        assert_eq!(group_cap(budget, 4_000, Duration::from_secs(2)), MIN_GROUP_SUBJECTS);
        assert_eq!(group_cap(budget, 64_000, Duration::from_millis(10)), MAX_GROUP_SUBJECTS);
        assert_eq!(group_cap(budget, 0, Duration::ZERO), MIN_GROUP_SUBJECTS);
        assert_eq!(group_cap(budget, 50_000, Duration::ZERO), MAX_GROUP_SUBJECTS);
    }

    #[test]
    fn a_big_group_of_many_customers_is_split_evenly() {
        let names: Vec<String> = (0..2000).map(|i| format!("cus_{i:04}")).collect();
        let owners: Vec<(&str, At)> = names.iter().map(|c| (c.as_str(), At { sync: 0, subject: 0 })).collect();
        let lens: Vec<usize> = shards(&owners, 2).iter().map(|s| s.len()).collect();
        assert_eq!(lens, vec![1000, 1000]);
        assert_eq!(shards(&owners[..999], 2).len(), 1, "too small to be worth two commits");
        assert!(shards(&[], 2).is_empty(), "nothing to write: no transaction");
    }
}
