//! The gateway sync protocol: what a gateway worker sends the ledger once per tick, and the
//! answer. Both sides compile these types, so they cannot drift apart.
//!
//! Usage travels as *ranges*: the calls a node let through for one subject are numbered
//! `0, 1, 2, …`; call `n` has the idempotency key `<node>/<subject>/<n>`, and consecutive calls
//! are reported together as one range with their total. A range is frozen once sent and is
//! re-sent unchanged until the ledger confirms it, so each call is booked exactly once however
//! often a range is retried.
//!
//! Leases (exact enforcement across nodes) are holds carved atomically out of the customer's live
//! balance. A node names its lease and numbers its requests for it, so a retried top-up is applied
//! once; usage ranges name the lease they were spent from, and the ledger captures them against it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::book::SettlementMode;
use crate::feature::FeatureKey;
use crate::money::{Amount, Currency};

/// Upper bounds the ledger enforces on one sync request (defined, with the reasons, in
/// [`crate::limits`]).
pub use crate::limits::{MAX_CALLS_PER_RANGE, MAX_SUBJECTS_PER_SYNC};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// Identifies the gateway node for the lifetime of its shared memory.
    pub node: String,
    pub subjects: Vec<SubjectSync>,
}

/// Everything a worker has to say about one subject in one tick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectSync {
    pub subject: String,
    pub currency: Currency,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_key: Option<FeatureKey>,
    /// Usage to book, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageRange>,
    /// Open, top up, renew or release the node's lease for this subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseRequest>,
}

/// A request about a node's lease. Every request renews the lease's TTL.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Chosen by the node, unique per node and subject (a new lease gets a new id).
    pub lease_id: String,
    /// Every top-up and every release takes a new, higher number. A top-up numbered at or below
    /// one already applied adds nothing (a retry); such a release is ignored (overtaken by a
    /// later request of the node); renewals repeat the last number and apply none, so a top-up
    /// with that number which they overtook on the way still adds.
    pub seq: u64,
    /// Credit to add to the lease, up to what is live (may be 0: renew only).
    pub want: Amount,
    pub ttl_ms: u64,
    /// Return what is left to the live balance and close the lease.
    #[serde(default)]
    pub release: bool,
}

/// Calls `from..to` (half-open) of a subject on a node, priced at `amount` in total.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageRange {
    pub from: u64,
    pub to: u64,
    pub amount: Amount,
    pub settlement_mode: SettlementMode,
    /// The lease the calls were spent from (captured against it); none under `cached`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    /// The incarnation of the node's record that numbered these calls: it keys the range
    /// instead of the node, so a record rebuilt after the host evicted it (numbering from 0
    /// again) never collides with what its predecessor sent, and a node that lost its id
    /// re-sends under the same key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Credit to give back for calls of this stream numbered before `from` (booked with earlier
    /// ranges): calls charged when they were let through whose response then made them cost
    /// less (an upstream error). Booked with this range, so exactly once; the ledger books it as
    /// credit of its own (see [`crate::gateway`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refunded: Amount,
}

fn is_zero(amount: &Amount) -> bool {
    amount.is_zero()
}

impl SubjectSync {
    /// The idempotency key of the usage range (and so of each call in it). Calls are numbered per
    /// origin (per node when the range names none), subject, currency and feature: one call can
    /// be priced in several features.
    pub fn usage_key(&self, node: &str) -> Option<String> {
        Some(self.usage.as_ref()?.key_in(&self.usage_stream(node)?))
    }

    /// The stream the usage range's calls are numbered in (see [`crate::usage_mark`]): its key
    /// without the calls.
    pub fn usage_stream(&self, node: &str) -> Option<String> {
        let feature = self.feature_key.as_ref().map_or("-", FeatureKey::as_str);
        let numbered_by = self.usage.as_ref()?.origin.as_deref().unwrap_or(node);
        Some(format!("{numbered_by}/{}/{}/{feature}", self.subject, self.currency))
    }
}

impl UsageRange {
    /// The range's key in its stream (see [`SubjectSync::usage_key`]).
    pub fn key_in(&self, stream: &str) -> String {
        format!("{stream}/{}-{}", self.from, self.to)
    }

    pub fn calls(&self) -> u64 {
        self.to.saturating_sub(self.from)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncResponse {
    #[serde(deserialize_with = "rfc3339")]
    pub server_time: DateTime<Utc>,
    pub subjects: Vec<SubjectAnswer>,
}

/// The ledger's answer for one subject, in request order. (Answers admit unknown fields so a
/// newer ledger can add some without breaking older gateways.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "SubjectAnswerWire")]
pub struct SubjectAnswer {
    pub subject: String,
    #[serde(flatten)]
    pub outcome: SubjectOutcome,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SubjectOutcome {
    /// The subject maps to a customer; its usage (if sent) is booked.
    Ok {
        customer_id: String,
        /// What happened to the range that was sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<UsageOutcome>,
        /// The live balance in the currency and feature scope asked for, after the booking.
        live: Amount,
        /// Increases with every change of the customer's book; older answers are stale.
        revision: i64,
        /// The lease after the request, if one was asked about.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<LeaseAnswer>,
    },
    /// No customer has this subject key: nothing was booked.
    UnknownSubject,
    /// The request about this subject was invalid (e.g. a range beyond the bounds).
    Rejected { reason: String },
}

/// A lease as the ledger holds it after a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAnswer {
    pub lease_id: String,
    /// Credit the lease still holds: granted minus captured usage.
    pub held: Amount,
    /// Added by this request (less than asked when less was live; zero for a retry).
    pub granted: Amount,
    #[serde(deserialize_with = "rfc3339")]
    pub expires_at: DateTime<Utc>,
    /// The lease is closed (released or expired): the node must open a new one.
    pub closed: bool,
    /// The customer's credit is wanted elsewhere (another lease of the customer was granted less
    /// than it asked while this one was open): give the lease back as soon as it is idle.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recalled: bool,
}

/// An instant as the ledger writes it: RFC 3339. Read by chrono's strict RFC 3339 parser rather
/// than `DateTime`'s own `Deserialize` (its relaxed `FromStr`, several times slower): a gateway
/// reads one per lease in an answer, up to 1,000 a tick (`bench/profile.sh`, c-ticks).
fn rfc3339<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&Utc)).map_err(serde::de::Error::custom)
}

/// A [`SubjectAnswer`] as read: one flat object. Derived `flatten` with an internally tagged
/// enum buffers every answer into serde's untyped `Content` before reading it a second time;
/// the gateway reads up to 1,000 of them a tick, and that buffering was a fifth of the tick's
/// cost (`bench/profile.sh`, c-ticks).
#[derive(Deserialize)]
struct SubjectAnswerWire {
    subject: String,
    status: Status,
    customer_id: Option<String>,
    usage: Option<UsageOutcome>,
    live: Option<Amount>,
    revision: Option<i64>,
    lease: Option<LeaseAnswer>,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum Status {
    Ok,
    UnknownSubject,
    Rejected,
}

impl TryFrom<SubjectAnswerWire> for SubjectAnswer {
    type Error = String;

    fn try_from(w: SubjectAnswerWire) -> Result<Self, String> {
        let missing = |field: &str| format!("missing field `{field}` in the answer for `{}`", w.subject);
        let outcome = match w.status {
            Status::Ok => SubjectOutcome::Ok {
                customer_id: w.customer_id.ok_or_else(|| missing("customer_id"))?,
                usage: w.usage,
                live: w.live.ok_or_else(|| missing("live"))?,
                revision: w.revision.ok_or_else(|| missing("revision"))?,
                lease: w.lease,
            },
            Status::UnknownSubject => SubjectOutcome::UnknownSubject,
            Status::Rejected => SubjectOutcome::Rejected { reason: w.reason.ok_or_else(|| missing("reason"))? },
        };
        Ok(SubjectAnswer { subject: w.subject, outcome })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageOutcome {
    Booked,
    /// This range was booked before (a retry): nothing was booked again.
    Duplicate,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_stable() {
        let answer = SubjectAnswer {
            subject: "alice".into(),
            outcome: SubjectOutcome::Ok {
                customer_id: "01J".into(),
                usage: Some(UsageOutcome::Booked),
                live: Amount::parse("0.90").unwrap(),
                revision: 7,
                lease: None,
            },
        };
        let text = serde_json::to_string(&answer).unwrap();
        assert_eq!(
            text,
            r#"{"subject":"alice","status":"ok","customer_id":"01J","usage":"booked","live":"0.90","revision":7}"#
        );
        assert_eq!(serde_json::from_str::<SubjectAnswer>(&text).unwrap(), answer);
        let unknown: SubjectAnswer = serde_json::from_str(r#"{"subject":"bob","status":"unknown_subject"}"#).unwrap();
        assert_eq!(unknown.outcome, SubjectOutcome::UnknownSubject);
    }

    #[test]
    fn answers_read_every_outcome_admit_new_fields_and_refuse_missing_ones() {
        let lease = LeaseAnswer {
            lease_id: "00ff/k".into(),
            held: Amount::parse("2").unwrap(),
            granted: Amount::parse("1").unwrap(),
            expires_at: DateTime::from_timestamp_millis(1_000).unwrap(),
            closed: false,
            recalled: true,
        };
        let outcomes = [
            SubjectOutcome::Ok {
                customer_id: "01J".into(),
                usage: Some(UsageOutcome::Duplicate),
                live: Amount::parse("-0.5").unwrap(),
                revision: 3,
                lease: Some(lease),
            },
            SubjectOutcome::UnknownSubject,
            SubjectOutcome::Rejected { reason: "range beyond bounds".into() },
        ];
        for outcome in outcomes {
            let answer = SubjectAnswer { subject: "a".into(), outcome };
            let mut value = serde_json::to_value(&answer).unwrap();
            assert_eq!(serde_json::from_value::<SubjectAnswer>(value.clone()).unwrap(), answer);
            value["added_by_a_newer_ledger"] = serde_json::json!({"x": [1]});
            assert_eq!(serde_json::from_value::<SubjectAnswer>(value).unwrap(), answer);
        }
        for (text, field) in [
            (r#"{"subject":"a","status":"ok","customer_id":"c","revision":1}"#, "live"),
            (r#"{"subject":"a","status":"ok","live":"1","revision":1}"#, "customer_id"),
            (r#"{"subject":"a","status":"ok","customer_id":"c","live":"1","revision":null}"#, "revision"),
            (r#"{"subject":"a","status":"rejected"}"#, "reason"),
        ] {
            let error = serde_json::from_str::<SubjectAnswer>(text).unwrap_err().to_string();
            assert!(error.contains(&format!("`{field}`")), "{text}: {error}");
        }
        for text in [r#"{"subject":"a","status":"maybe"}"#, r#"{"status":"unknown_subject"}"#, r#"{"subject":"a"}"#] {
            assert!(serde_json::from_str::<SubjectAnswer>(text).is_err(), "{text}");
        }
    }

    #[test]
    fn answer_times_are_read_as_rfc3339_at_any_precision_and_offset() {
        let read = |time: &str| {
            serde_json::from_value::<SyncResponse>(serde_json::json!({"server_time": time, "subjects": []}))
                .map(|r| r.server_time)
        };
        // What the ledger writes (chrono's own serialization), at every precision it can have.
        for nanos in [0, 1_000_000, 123_456_000, 123_456_789] {
            let t = DateTime::from_timestamp(1_764_892_800, nanos).unwrap();
            let written = serde_json::to_value(SyncResponse { server_time: t, subjects: Vec::new() }).unwrap();
            assert_eq!(serde_json::from_value::<SyncResponse>(written).unwrap().server_time, t);
        }
        let utc = DateTime::from_timestamp(1_764_892_800, 500_000_000).unwrap();
        for same in ["2025-12-05T00:00:00.5Z", "2025-12-05T00:00:00.500+00:00", "2025-12-05T01:00:00.5+01:00"] {
            assert_eq!(read(same).unwrap(), utc, "{same}");
        }
        for bad in ["", "2025-12-05", "2025-12-05T00:00:00", "yesterday", "2025-13-05T00:00:00Z", "1764892800"] {
            assert!(read(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn usage_keys_name_node_subject_scope_and_calls() {
        let r = UsageRange {
            from: 10,
            to: 15,
            amount: Amount::parse("0.50").unwrap(),
            settlement_mode: SettlementMode::CreditOnly,
            lease_id: None,
            origin: None,
            refunded: Amount::ZERO,
        };
        assert_eq!(r.calls(), 5);
        let mut s = SubjectSync {
            subject: "alice".into(),
            currency: Currency::parse("USD").unwrap(),
            feature_key: None,
            usage: Some(r.clone()),
            lease: None,
        };
        assert_eq!(s.usage_key("n1").as_deref(), Some("n1/alice/USD/-/10-15"));
        s.feature_key = Some(FeatureKey::parse("output_tokens").unwrap());
        assert_eq!(s.usage_key("n1").as_deref(), Some("n1/alice/USD/output_tokens/10-15"));
        s.usage = None;
        assert_eq!(s.usage_key("n1"), None);
        s.usage = Some(UsageRange { origin: Some("00ff".into()), ..r });
        assert_eq!(s.usage_key("n1").as_deref(), Some("00ff/alice/USD/output_tokens/10-15"));
        assert_eq!(s.usage_key("n2"), s.usage_key("n1"), "the origin keys it, whichever node sends it");
    }
}
