//! The delivery job: claims due deliveries, posts them to their channels with Standard Webhooks
//! headers, and records the outcome. A failed or timed-out attempt is retried after
//! `retry_ms × 2^(attempt−1)` (capped) until `max_attempts`; every attempt of an event carries
//! the same `webhook-id`. Bookings only write outbox rows, so a slow receiver never slows them.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio::task::JoinSet;

use super::{expiring, signature};
use crate::db::Db;
use crate::metrics::Metrics;
use crate::store::channels::{self, ChannelRecord};
use crate::store::outbox::{self, Attempted, Claimed, FAILED, PENDING, SUCCESS};
use crate::store::{new_id, StoreResult};

#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// The first retry's delay; each further retry waits twice as long as the one before.
    pub retry_ms: u64,
    /// The longest wait between two attempts.
    pub max_retry_ms: u64,
    /// Attempts per delivery, the first included.
    pub max_attempts: u32,
    /// How long one attempt may take before it counts as failed.
    pub timeout_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig { retry_ms: 5000, max_retry_ms: 3_600_000, max_attempts: 10, timeout_ms: 10_000 }
    }
}

impl WebhookConfig {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: i64) -> Duration {
        let doublings = u32::try_from(attempt.saturating_sub(1).clamp(0, 40)).unwrap_or(40);
        let ms = self.retry_ms.saturating_mul(1u64 << doublings).min(self.max_retry_ms.max(self.retry_ms));
        Duration::from_millis(ms)
    }

    /// How often the job looks for due deliveries.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.retry_ms.clamp(10, 1000))
    }
}

/// Deliveries one pass claims at most (and posts concurrently).
const BATCH: i64 = 32;
/// A claim outlives its attempt's timeout by this much; after that another instance may retry.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// How often expiring grants are looked for.
const SCAN_INTERVAL: Duration = Duration::from_secs(1);

/// Runs until the task is aborted.
pub async fn run(db: Db, metrics: Arc<Metrics>, config: WebhookConfig) {
    let client = match client(&config) {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "webhook delivery is off: no HTTP client"),
    };
    let mut ticker = tokio::time::interval(config.poll_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_scan: Option<tokio::time::Instant> = None;
    loop {
        ticker.tick().await;
        if last_scan.is_none_or(|t| t.elapsed() >= SCAN_INTERVAL) {
            last_scan = Some(tokio::time::Instant::now());
            if let Err(e) = scan_expiring(&db, &metrics).await {
                tracing::warn!(error = %e, "expiring-grant scan failed; retrying");
            }
        }
        if let Err(e) = pass(&db, &metrics, &client, &config).await {
            tracing::warn!(error = %e, "webhook delivery pass failed; retrying");
        }
    }
}

async fn scan_expiring(db: &Db, metrics: &Metrics) -> StoreResult<()> {
    let now = {
        let mut conn = db.pool().acquire().await?;
        db.now(&mut conn).await?
    };
    let written = expiring::scan(db, now).await?;
    metrics.add("notification_events", written as u64);
    Ok(())
}

/// The HTTP client of every attempt: no redirects (a receiver that moved must be reconfigured,
/// not followed), a timeout per attempt.
pub fn client(config: &WebhookConfig) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(config.timeout_ms))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("credits-ledger/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// One pass: claim what is due, post it, record the outcomes. Returns the attempts made.
pub async fn pass(db: &Db, metrics: &Metrics, client: &reqwest::Client, config: &WebhookConfig) -> StoreResult<usize> {
    let token = new_id();
    let max_attempts = i64::from(config.max_attempts.max(1));
    let (claimed, payloads, channels) = {
        let mut w = db.begin_write().await?;
        let now = db.now(&mut w.tx).await?;
        let given_up = outbox::fail_abandoned(&mut w.tx, now, max_attempts).await?;
        metrics.add("webhook_deliveries_failed", given_up);
        let lease = TimeDelta::from_std(Duration::from_millis(config.timeout_ms).saturating_add(LEASE_MARGIN))
            .unwrap_or_default();
        let until = now.checked_add_signed(lease).unwrap_or(now);
        let claimed = outbox::claim(&mut w.tx, db.backend(), now, until, &token, max_attempts, BATCH).await?;
        w.commit().await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let mut conn = db.pool().acquire().await?;
        let events: Vec<String> = claimed.iter().map(|c| c.event_id.clone()).collect();
        let channel_ids: Vec<String> = claimed.iter().map(|c| c.channel_id.clone()).collect();
        (claimed, outbox::payloads(&mut conn, &events).await?, channels::by_ids(&mut conn, &channel_ids).await?)
    };
    let mut attempts = JoinSet::new();
    for c in claimed {
        let payload = payloads.get(&c.event_id).cloned().unwrap_or_default();
        let channel = channels.get(&c.channel_id).cloned();
        let client = client.clone();
        attempts.spawn(async move {
            let result = post(&client, channel.as_ref(), &c.event_id, &payload).await;
            (c, result)
        });
    }
    let mut made: usize = 0;
    while let Some(joined) = attempts.join_next().await {
        let Ok((c, result)) = joined else { continue };
        record(db, metrics, config, &token, &c, result).await?;
        made = made.saturating_add(1);
    }
    Ok(made)
}

/// Why an attempt failed: the receiver's status if it answered, and whether to retry at all.
#[derive(Debug)]
pub struct Failure {
    pub status: Option<u16>,
    pub error: String,
    pub retry: bool,
}

/// Posts one event to one channel; the receiver's status on a 2xx answer.
pub async fn post(
    client: &reqwest::Client,
    channel: Option<&ChannelRecord>,
    event_id: &str,
    payload: &str,
) -> Result<u16, Failure> {
    let fail = |status, error: String, retry| Failure { status, error, retry };
    let Some(channel) = channel.filter(|c| c.deleted_at.is_none()) else {
        return Err(fail(None, "the channel was deleted".into(), false));
    };
    let key = signature::key(&channel.signing_secret).map_err(|e| fail(None, format!("signing secret {e}"), false))?;
    let timestamp = Utc::now().timestamp();
    let mut request = client
        .post(&channel.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature::sign(&key, event_id, timestamp, payload.as_bytes()));
    for (name, value) in &channel.custom_headers {
        request = request.header(name, value);
    }
    match request.body(payload.to_owned()).send().await {
        Ok(response) if response.status().is_success() => Ok(response.status().as_u16()),
        Ok(response) => {
            let status = response.status().as_u16();
            Err(fail(Some(status), format!("the receiver answered {status}"), true))
        }
        Err(e) if e.is_timeout() => Err(fail(None, "the receiver did not answer in time".into(), true)),
        Err(e) => Err(fail(None, format!("could not reach the receiver: {}", e.without_url()), true)),
    }
}

async fn record(
    db: &Db,
    metrics: &Metrics,
    config: &WebhookConfig,
    token: &str,
    c: &Claimed,
    result: Result<u16, Failure>,
) -> StoreResult<()> {
    let mut w = db.begin_write().await?;
    let now = db.now(&mut w.tx).await?;
    let attempted = outcome(config, c.attempt, &result, now);
    let error = result.as_ref().err().map(|f| f.error.as_str());
    outbox::record(&mut w.tx, c, token, &Attempted { error, ..attempted }).await?;
    w.commit().await?;
    match (&result, attempted.status) {
        (Ok(_), _) => metrics.add("webhook_attempts_succeeded", 1),
        (Err(f), status) => {
            tracing::warn!(event = %c.event_id, channel = %c.channel_id, attempt = c.attempt, error = %f.error, "webhook attempt failed");
            metrics.add("webhook_attempts_failed", 1);
            if status == FAILED {
                metrics.add("webhook_deliveries_failed", 1);
            }
        }
    }
    Ok(())
}

/// What an attempt's result means for its delivery (the error text is filled in by the caller).
pub fn outcome(
    config: &WebhookConfig,
    attempt: i64,
    result: &Result<u16, Failure>,
    now: DateTime<Utc>,
) -> Attempted<'static> {
    match result {
        Ok(status) => {
            Attempted { status: SUCCESS, next_attempt_at: now, response_status: Some(*status), error: None, at: now }
        }
        Err(f) => {
            let last = !f.retry || attempt >= i64::from(config.max_attempts.max(1));
            let wait = TimeDelta::from_std(config.backoff(attempt)).unwrap_or_default();
            Attempted {
                status: if last { FAILED } else { PENDING },
                next_attempt_at: if last { now } else { now.checked_add_signed(wait).unwrap_or(now) },
                response_status: f.status,
                error: None,
                at: now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_and_is_capped() {
        let config = WebhookConfig { retry_ms: 5000, max_retry_ms: 60_000, max_attempts: 10, timeout_ms: 1000 };
        let waits: Vec<u64> = (1..=6).map(|n| config.backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [5000, 10_000, 20_000, 40_000, 60_000, 60_000]);
        assert_eq!(config.backoff(1000).as_millis(), 60_000);
    }

    #[test]
    fn a_delivery_fails_for_good_after_its_last_attempt_or_a_permanent_error() {
        let config = WebhookConfig { max_attempts: 3, ..WebhookConfig::default() };
        let now = Utc::now();
        let retryable = Err(Failure { status: Some(500), error: String::new(), retry: true });
        let permanent = Err(Failure { status: None, error: String::new(), retry: false });
        assert_eq!(outcome(&config, 1, &retryable, now).status, PENDING);
        assert_eq!(outcome(&config, 1, &retryable, now).next_attempt_at, now + TimeDelta::seconds(5));
        assert_eq!(outcome(&config, 2, &retryable, now).next_attempt_at, now + TimeDelta::seconds(10));
        assert_eq!(outcome(&config, 3, &retryable, now).status, FAILED);
        assert_eq!(outcome(&config, 1, &permanent, now).status, FAILED);
        assert_eq!(outcome(&config, 1, &Ok(204), now).status, SUCCESS);
    }
}
