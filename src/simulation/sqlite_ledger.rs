//! The real ledger in-process: its sync entry point, booking code, expiry job and journal check
//! over an SQLite file, on a manual clock the simulator moves. A restart closes every connection
//! and opens the same file again (what a crash after the last commit leaves).

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use credits::sync::{SyncRequest, SyncResponse};
use credits::{Amount, GrantId};
use ledger::api::request::Json;
use ledger::api::{self, AppState, Auth};
use ledger::db::{micros, Clock, Db};
use ledger::store::{books, customers};
use serde_json::json;
use sqlx::Row;

use super::backend::{at, iso_ms, parse_range_key, Books, GrantPlan, Ledger};

pub struct SqliteLedger {
    runtime: tokio::runtime::Runtime,
    dir: PathBuf,
    url: String,
    /// The ledger's clock, and the handle that moves it.
    clock: Clock,
    instant: Arc<AtomicI64>,
    state: Option<AppState>,
    customer_id: String,
    /// The scenario's grants, in order.
    grant_ids: Vec<String>,
    /// What the ledger failed to do (nothing is expected to fail: its store never does here).
    failures: Vec<String>,
}

/// Temp files on tmpfs where there is one: the simulator needs no durability, only the code path.
fn scratch_dir() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = PathBuf::from("/dev/shm");
    let base = if base.is_dir() { base } else { std::env::temp_dir() };
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    base.join(format!("prepaid-credits-sim-{}-{n}", std::process::id()))
}

fn created(status: StatusCode, what: &str) {
    assert_eq!(status, StatusCode::CREATED, "creating {what}");
}

impl SqliteLedger {
    pub fn new(subject: &str, price: Amount, grants: &[GrantPlan], now: DateTime<Utc>) -> SqliteLedger {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = scratch_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("ledger.db").display());
        let (clock, instant) = Clock::manual(now);
        let mut ledger = SqliteLedger {
            runtime,
            dir,
            url,
            clock,
            instant,
            state: None,
            customer_id: String::new(),
            grant_ids: Vec::new(),
            failures: Vec::new(),
        };
        ledger.restart();
        let state = ledger.state().clone();
        (ledger.customer_id, ledger.grant_ids) = ledger.runtime.block_on(async {
            let body = json!({"name": subject, "key": subject, "usage_attribution": {"subject_keys": [subject]}});
            let response = api::customers::create(State(state.clone()), Json(serde_json::from_value(body).unwrap()))
                .await
                .unwrap();
            created(response.status(), "the customer");
            let mut conn = state.db.pool().acquire().await.unwrap();
            let id = customers::by_subject(&mut conn, subject).await.unwrap().unwrap();
            let mut grant_ids = Vec::new();
            for plan in grants {
                let mut body = json!({"name": "grant", "funding_method": "none", "currency": "USD",
                    "amount": price.times(plan.calls).unwrap().to_string(), "priority": plan.priority,
                    "effective_at": at(plan.effective_ms)});
                if let Some(ms) = plan.expires_after_ms {
                    body["expires_after"] = json!(iso_ms(ms));
                }
                let request = Json(serde_json::from_value(body).unwrap());
                let response = api::grants::create(State(state.clone()), Path(id.clone()), request).await.unwrap();
                created(response.status(), "a grant");
                let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
                let grant: serde_json::Value = serde_json::from_slice(&body).unwrap();
                grant_ids.push(grant["id"].as_str().unwrap().to_owned());
            }
            (id, grant_ids)
        });
        ledger
    }

    fn state(&self) -> &AppState {
        self.state.as_ref().unwrap()
    }

    fn set_clock(&self, now: DateTime<Utc>) {
        self.instant.store(micros(now), Ordering::SeqCst);
    }
}

impl Ledger for SqliteLedger {
    fn serve(&mut self, request: &SyncRequest, now: DateTime<Utc>) -> Option<SyncResponse> {
        self.set_clock(now);
        let state = self.state().clone();
        match self.runtime.block_on(api::gateway::serve(&state, request.clone())) {
            Ok(response) => Some(response),
            Err(p) => {
                self.failures.push(format!("{} {}", p.status, p.detail));
                None
            }
        }
    }

    fn job(&mut self, now: DateTime<Utc>) {
        self.set_clock(now);
        let state = self.state().clone();
        if let Err(e) = self.runtime.block_on(ledger::expiry::pass(&state)) {
            self.failures.push(format!("expiry pass: {e}"));
        }
    }

    fn restart(&mut self) {
        if let Some(state) = self.state.take() {
            self.runtime.block_on(state.db.pool().close());
        }
        let db = self.runtime.block_on(Db::connect(&self.url)).unwrap().with_clock(self.clock.clone());
        let max_body_bytes = ledger::api::request::DEFAULT_MAX_BODY_BYTES;
        self.state = Some(AppState {
            db,
            auth: Auth::Open,
            metrics: Default::default(),
            max_body_bytes,
            syncs: Default::default(),
            books: Default::default(),
        });
    }

    fn grant_id(&self, index: usize) -> Option<GrantId> {
        self.grant_ids.get(index).map(|id| GrantId(id.clone()))
    }

    fn void(&mut self, grant: &GrantId, now: DateTime<Utc>) {
        self.set_clock(now);
        let state = self.state().clone();
        let path = Path((self.customer_id.clone(), grant.0.clone()));
        if let Err(p) = self.runtime.block_on(api::grants::void(State(state), path)) {
            self.failures.push(format!("void: {} {}", p.status, p.detail));
        }
    }

    fn books(&mut self) -> Books {
        let state = self.state().clone();
        let customer_id = self.customer_id.clone();
        let failures = std::mem::take(&mut self.failures);
        self.runtime.block_on(async {
            let mut conn = state.db.pool().acquire().await.unwrap();
            let book = books::load(&mut conn, &customer_id).await.unwrap().book;
            let mut total = async |kind: &str| -> Amount {
                sqlx::query("SELECT amount FROM movements WHERE kind = $1")
                    .bind(kind)
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap()
                    .iter()
                    .map(|r| Amount::parse(&r.get::<String, _>(0)).unwrap())
                    .sum()
            };
            let consumed = -total("consumed").await;
            // The one adjustment a sync books: credit given back.
            let refunded = total("adjusted").await;
            // The ranges booked, from the ledger's records of them: each stream's mark (every
            // call below it booked) and the keys of ranges booked apart from it. (A range may
            // book no journal entry: its calls failed and were refunded, costing nothing.)
            let mut booked = std::collections::BTreeMap::<String, Vec<(u64, u64)>>::new();
            let mut marks = std::collections::BTreeMap::<String, u64>::new();
            for r in sqlx::query("SELECT stream, booked_to FROM usage_marks").fetch_all(&mut *conn).await.unwrap() {
                let (stream, booked_to) = (r.get::<String, _>(0), u64::try_from(r.get::<i64, _>(1)).unwrap());
                let origin = stream.split('/').next().unwrap().to_owned();
                marks.insert(origin.clone(), booked_to);
                if booked_to > 0 {
                    booked.entry(origin).or_default().push((0, booked_to));
                }
            }
            for r in sqlx::query("SELECT key FROM usage_records").fetch_all(&mut *conn).await.unwrap() {
                let (origin, from, to) = parse_range_key(&r.get::<String, _>(0)).unwrap();
                if to > marks.get(&origin).copied().unwrap_or(0) {
                    booked.entry(origin).or_default().push((from, to));
                }
            }
            drop(conn);
            let mut problems = ledger::check::run(&state.db).await.unwrap();
            problems.extend(failures.into_iter().map(|f| format!("the ledger failed: {f}")));
            Books { book, consumed, refunded, booked, problems }
        })
    }
}

impl Drop for SqliteLedger {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            self.runtime.block_on(state.db.pool().close());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
