//! The filter's configuration: one JSON object, parsed and validated once per configure.
//! `plugin-schema/prepaid_credits.meta.json` describes the same thing for Kong; a test holds
//! the two to the same verdicts.

use credits::limits::MAX_LEASE_TTL_MS;
use credits::{Amount, Currency, FeatureKey, SettlementMode};
use serde::Deserialize;

pub use crate::fields::ConfigError;
use crate::fields::{amount, bounded, error, header_name, list, object, present, status, to_u32, whole, Object};
use crate::pricing::{self, Pricing, RawPricing};

/// Amounts (`price`, `offline_allowance`) go up to 10^15 (`credits::limits::MAX_AMOUNT`).
const AMOUNT_DIGITS: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterConfig {
    pub ledger: LedgerConfig,
    pub subject: SubjectConfig,
    /// The fixed price of every call (zero when only `pricing.units` price calls).
    pub price: Amount,
    pub currency: Currency,
    /// The feature the fixed price is charged in.
    pub feature_key: Option<FeatureKey>,
    pub pricing: Pricing,
    pub settlement_mode: SettlementMode,
    pub sync: SyncConfig,
    pub lease: LeaseConfig,
    pub failure_mode: FailureMode,
    /// Credit a customer may spend per node while the ledger is unreachable and nothing usable
    /// is cached (`allow` only); `None` = unbounded.
    pub offline_allowance: Option<Amount>,
    pub response_headers: ResponseHeaders,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Envoy cluster name, or `host:port` / `ip:port` under Kong's engine.
    pub upstream: String,
    pub authority: String,
    /// `{ledger.base_path}/gateway/sync`, built once: a base path of `/` gives `/gateway/sync`.
    pub sync_path: String,
    pub token: String,
    pub timeout_ms: u32,
    /// Call the ledger over TLS (`:scheme: https`): Kong's engine then opens a TLS connection;
    /// under Envoy, TLS is the ledger cluster's transport socket.
    pub tls: bool,
}

impl LedgerConfig {
    /// `host:port` with a host name rather than an IP: Kong resolves it with nginx's resolver
    /// (not /etc/hosts), outside the dispatch timeout.
    pub fn upstream_is_host_name(&self) -> bool {
        match self.upstream.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                host.parse::<std::net::IpAddr>().is_err()
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubjectConfig {
    pub header: String,
    /// Headers that must come with the subject (e.g. `x-credential-identifier`, which Kong's
    /// authentication plugins set together with the consumer headers); a call without them is
    /// refused like one without a subject.
    pub require_headers: Vec<String>,
    /// The status of the answer to a call without a subject.
    pub missing_status: u16,
    /// The status of the answer to a subject the ledger knows no customer for.
    pub unknown_status: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Spend from a cached live balance; overspend across nodes is bounded by the sync interval.
    Cached,
    /// Spend only from credit the ledger holds for this node: exact across nodes.
    Lease,
}

/// How a node sizes, renews and gives back its leases.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    /// A lease covers at least this many calls ...
    pub min_calls: u64,
    /// ... and at most this many.
    pub max_calls: u64,
    /// Top up when less than this share (percent) of the target is left.
    pub low_water_percent: u64,
    /// A lease should last this long at the customer's observed rate.
    pub horizon_ms: u64,
    /// Give the lease back after this long without calls (`lease::idle_after_ms`: sooner once
    /// the ledger recalled it).
    pub idle_release_ms: u64,
    /// The ledger releases a lease not renewed for this long.
    pub ttl_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncConfig {
    pub strategy: Strategy,
    pub interval_ms: u32,
    /// A cached balance older than this (no successful refresh) is not used.
    pub max_stale_ms: u32,
    /// A customer unused this long is no longer refreshed by the worker.
    pub idle_ms: u32,
    /// Unsent calls a node keeps per customer before the failure mode applies.
    pub max_unsent_calls: u64,
    /// How long a "no such customer" answer is remembered.
    pub unknown_ttl_ms: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    Deny,
    Allow,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHeaders {
    pub balance: Option<String>,
    pub cost: Option<String>,
}

// The raw shapes, exactly as the JSON schema describes them. Members are read through
// `fields::{object, list, present}`: serde alone takes more than the schema does (`null` for
// an absent member, an object written as an array).

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(deserialize_with = "object")]
    ledger: RawLedger,
    #[serde(default, deserialize_with = "object")]
    subject: RawSubject,
    #[serde(default, deserialize_with = "present")]
    price: Option<String>,
    currency: String,
    #[serde(default, deserialize_with = "present")]
    feature_key: Option<String>,
    #[serde(default, deserialize_with = "object")]
    pricing: RawPricing,
    #[serde(default, deserialize_with = "present")]
    settlement_mode: Option<String>,
    #[serde(default, deserialize_with = "object")]
    sync: RawSync,
    #[serde(default, deserialize_with = "object")]
    lease: RawLease,
    #[serde(default, deserialize_with = "present")]
    failure_mode: Option<String>,
    #[serde(default, deserialize_with = "present")]
    offline_allowance: Option<String>,
    #[serde(default, deserialize_with = "object")]
    response_headers: RawHeaders,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLedger {
    upstream: String,
    #[serde(default, deserialize_with = "present")]
    authority: Option<String>,
    #[serde(default, deserialize_with = "present")]
    base_path: Option<String>,
    token: String,
    #[serde(default, deserialize_with = "whole")]
    timeout_ms: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    tls: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSubject {
    #[serde(default, deserialize_with = "present")]
    header: Option<String>,
    #[serde(default, deserialize_with = "list")]
    require_headers: Vec<String>,
    #[serde(default, deserialize_with = "whole")]
    missing_status: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    unknown_status: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSync {
    #[serde(default, deserialize_with = "present")]
    strategy: Option<String>,
    #[serde(default, deserialize_with = "whole")]
    interval_ms: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    max_stale_ms: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    idle_ms: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    max_unsent_calls: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    unknown_ttl_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLease {
    #[serde(default, deserialize_with = "whole")]
    min_calls: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    max_calls: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    low_water_percent: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    horizon_ms: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    idle_release_ms: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    ttl_ms: Option<u64>,
}

/// `null` switches a header off; absent means the default name.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHeaders {
    #[serde(default, deserialize_with = "explicit")]
    balance: Option<Option<String>>,
    #[serde(default, deserialize_with = "explicit")]
    cost: Option<Option<String>>,
}

fn explicit<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

impl FilterConfig {
    /// How long after a customer's sync leaves its answer comes at the latest when that sync
    /// fails once: its timeout, the next tick (which sends the customer again: `Tracker::failed`),
    /// and that sync's timeout. What the node holds for a customer must last that long past its
    /// turn.
    pub fn answered_despite_a_failure_ms(&self) -> u64 {
        2 * u64::from(self.ledger.timeout_ms) + u64::from(self.sync.interval_ms)
    }

    pub fn parse(bytes: &[u8]) -> Result<FilterConfig, ConfigError> {
        let de = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: Object<RawConfig> = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
            let path = e.path().to_string();
            let message = e.inner().to_string();
            let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
            let field = match message.split('`').nth(1) {
                // serde_path_to_error already ends the path with the unknown field's name.
                Some(name) if message.starts_with("unknown field") && path == "." => name.to_owned(),
                Some(name) if message.starts_with("missing field") && path == "." => name.to_owned(),
                Some(name) if message.starts_with("missing field") => format!("{path}.{name}"),
                _ if path == "." => "configuration".to_owned(),
                _ => path,
            };
            ConfigError { field, message }
        })?;
        // One JSON value, as a schema validates: serde stops at its end, whatever follows.
        de.end().map_err(|e| error("configuration", e.to_string()))?;
        Self::from_raw(raw.0)
    }

    fn from_raw(raw: RawConfig) -> Result<FilterConfig, ConfigError> {
        let ledger = raw.ledger.validate()?;
        let subject = raw.subject.validate()?;
        let price = match raw.price.as_deref() {
            Some(text) => amount("price", text, AMOUNT_DIGITS)?,
            None if !raw.pricing.has_units() => return Err(error("price", "missing field `price`")),
            None => Amount::ZERO,
        };
        let currency = Currency::parse(&raw.currency).map_err(|e| error("currency", e.to_string()))?;
        let feature_key = raw
            .feature_key
            .as_deref()
            .map(FeatureKey::parse)
            .transpose()
            .map_err(|e| error("feature_key", e.to_string()))?;
        let pricing = pricing::parse(raw.pricing, price, feature_key.clone())?;
        let settlement_mode = match raw.settlement_mode.as_deref().unwrap_or("credit_only") {
            "credit_only" => SettlementMode::CreditOnly,
            "credit_then_invoice" => SettlementMode::CreditThenInvoice,
            other => {
                return Err(error("settlement_mode", format!("{other:?} is not credit_only or credit_then_invoice")))
            }
        };
        let sync = raw.sync.validate(settlement_mode)?;
        let lease = raw.lease.validate(&sync, ledger.timeout_ms)?;
        let failure_mode = match raw.failure_mode.as_deref().unwrap_or("deny") {
            "deny" => FailureMode::Deny,
            "allow" => FailureMode::Allow,
            other => return Err(error("failure_mode", format!("{other:?} is not deny or allow"))),
        };
        let offline_allowance =
            raw.offline_allowance.as_deref().map(|t| amount("offline_allowance", t, AMOUNT_DIGITS)).transpose()?;
        let response_headers = raw.response_headers.validate()?;
        Ok(FilterConfig {
            ledger,
            subject,
            price,
            currency,
            feature_key,
            pricing,
            settlement_mode,
            sync,
            lease,
            failure_mode,
            offline_allowance,
            response_headers,
        })
    }
}

impl RawLedger {
    fn validate(self) -> Result<LedgerConfig, ConfigError> {
        // Visible ASCII only, as every engine counts and classes it alike: Kong's PCRE matches
        // bytes (`\S` would take a multi-byte space, and `{1,256}` counts bytes).
        let plain = |s: &str| !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic());
        if !plain(&self.upstream) {
            return Err(error("ledger.upstream", "must be a cluster name or host:port without spaces"));
        }
        let authority = self.authority.unwrap_or_else(|| self.upstream.clone());
        if !plain(&authority) {
            return Err(error("ledger.authority", "must be a host name without spaces"));
        }
        let base_path = self.base_path.unwrap_or_else(|| "/v3".to_owned());
        let segments_ok = base_path == "/"
            || base_path.strip_prefix('/').is_some_and(|rest| {
                // It goes into the `:path` of every sync: visible ASCII, no space, control
                // character or anything Kong's byte-wise PCRE would class otherwise.
                let plain = |b: u8| b.is_ascii_graphic() && !matches!(b, b'?' | b'#');
                rest.split('/').all(|s| !s.is_empty() && s.bytes().all(plain))
            });
        if !segments_ok {
            return Err(error("ledger.base_path", "must be / or /segment[/segment…] (e.g. /v3)"));
        }
        if self.token.is_empty() || self.token.contains(['\r', '\n']) {
            return Err(error("ledger.token", "must be a non-empty bearer token"));
        }
        Ok(LedgerConfig {
            upstream: self.upstream,
            authority,
            sync_path: format!("{}/gateway/sync", base_path.trim_end_matches('/')),
            token: self.token,
            timeout_ms: to_u32(bounded("ledger.timeout_ms", self.timeout_ms, 1000, 1, 60_000)?),
            tls: self.tls.unwrap_or(false),
        })
    }
}

impl RawSubject {
    fn validate(self) -> Result<SubjectConfig, ConfigError> {
        let header = header_name("subject.header", self.header.as_deref().unwrap_or("x-consumer-username"))?;
        let require = self.require_headers;
        if require.len() > 8 {
            return Err(error("subject.require_headers", "at most 8 headers"));
        }
        let require_headers = require
            .iter()
            .enumerate()
            .map(|(i, h)| header_name(&format!("subject.require_headers[{i}]"), h))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(SubjectConfig {
            header,
            require_headers,
            missing_status: status("subject.missing_status", self.missing_status, 401)?,
            unknown_status: status("subject.unknown_status", self.unknown_status, 403)?,
        })
    }
}

impl RawSync {
    fn validate(self, settlement_mode: SettlementMode) -> Result<SyncConfig, ConfigError> {
        // Exact leases by default where calls are refused for lack of credit.
        let default_strategy = match settlement_mode {
            SettlementMode::CreditOnly => "lease",
            SettlementMode::CreditThenInvoice => "cached",
        };
        let strategy = match self.strategy.as_deref().unwrap_or(default_strategy) {
            "cached" => Strategy::Cached,
            "lease" => Strategy::Lease,
            other => return Err(error("sync.strategy", format!("{other:?} is not a strategy (lease or cached)"))),
        };
        Ok(SyncConfig {
            strategy,
            interval_ms: to_u32(bounded("sync.interval_ms", self.interval_ms, 1000, 50, 60_000)?),
            max_stale_ms: to_u32(bounded("sync.max_stale_ms", self.max_stale_ms, 60_000, 100, 86_400_000)?),
            idle_ms: to_u32(bounded("sync.idle_ms", self.idle_ms, 300_000, 1_000, 86_400_000)?),
            max_unsent_calls: bounded(
                "sync.max_unsent_calls",
                self.max_unsent_calls,
                1_000_000,
                1,
                credits::sync::MAX_CALLS_PER_RANGE,
            )?,
            unknown_ttl_ms: to_u32(bounded("sync.unknown_ttl_ms", self.unknown_ttl_ms, 10_000, 0, 3_600_000)?),
        })
    }
}

impl RawLease {
    fn validate(self, sync: &SyncConfig, timeout_ms: u32) -> Result<LeaseConfig, ConfigError> {
        // Renewals ride on the sync tick, and a node stops spending a lease interval + timeout
        // (and a tenth of the TTL) before it could expire: the TTL must leave room to spend.
        let interval_ms = u64::from(sync.interval_ms);
        let ttl_floor = 3 * (interval_ms + u64::from(timeout_ms));
        let lease = LeaseConfig {
            min_calls: bounded("lease.min_calls", self.min_calls, 10, 1, 1_000_000)?,
            max_calls: bounded("lease.max_calls", self.max_calls, 100_000, 1, 1_000_000)?,
            low_water_percent: bounded("lease.low_water_percent", self.low_water_percent, 50, 1, 100)?,
            horizon_ms: bounded(
                "lease.horizon_ms",
                self.horizon_ms,
                2 * interval_ms + u64::from(timeout_ms),
                1,
                3_600_000,
            )?,
            idle_release_ms: bounded("lease.idle_release_ms", self.idle_release_ms, 300_000, 100, 86_400_000)?,
            ttl_ms: bounded("lease.ttl_ms", self.ttl_ms, ttl_floor.max(30_000), 1_000, MAX_LEASE_TTL_MS)?,
        };
        if lease.min_calls > lease.max_calls {
            return Err(error("lease.min_calls", "must not exceed lease.max_calls"));
        }
        if sync.strategy == Strategy::Lease && lease.ttl_ms < ttl_floor {
            let message = format!("must be at least 3 × (sync.interval_ms + ledger.timeout_ms) = {ttl_floor}");
            return Err(error("lease.ttl_ms", message));
        }
        Ok(lease)
    }
}

impl RawHeaders {
    /// `null` switches a header off; absent means the default name.
    fn validate(self) -> Result<ResponseHeaders, ConfigError> {
        let name = |field: &str, value: Option<Option<String>>, default: &str| match value {
            None => Ok(Some(default.to_owned())),
            Some(None) => Ok(None),
            Some(Some(name)) => header_name(field, &name).map(Some),
        };
        Ok(ResponseHeaders {
            balance: name("response_headers.balance", self.balance, "x-credits-balance")?,
            cost: name("response_headers.cost", self.cost, "x-credits-cost")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"ledger": {"upstream": "ledger", "token": "t"}, "price": "0.01", "currency": "USD"}"#;

    #[test]
    fn defaults_fill_in() {
        let c = FilterConfig::parse(MINIMAL.as_bytes()).unwrap();
        assert_eq!(c.ledger.authority, "ledger");
        assert_eq!(c.ledger.sync_path, "/v3/gateway/sync");
        assert_eq!(c.ledger.timeout_ms, 1000);
        assert!(!c.ledger.tls);
        assert!(!c.ledger.upstream_is_host_name(), "an Envoy cluster name");
        let kong = |u: &str| {
            FilterConfig::parse(
                format!(r#"{{"ledger": {{"upstream": "{u}", "token": "t"}}, "price": "1", "currency": "USD"}}"#)
                    .as_bytes(),
            )
            .unwrap()
        };
        assert!(kong("ledger.internal:8480").ledger.upstream_is_host_name());
        assert!(!kong("10.0.0.7:8480").ledger.upstream_is_host_name());
        assert!(!kong("[::1]:8480").ledger.upstream_is_host_name());
        assert_eq!(c.subject.header, "x-consumer-username");
        assert_eq!(c.settlement_mode, SettlementMode::CreditOnly);
        assert_eq!(c.failure_mode, FailureMode::Deny);
        assert_eq!(c.sync.interval_ms, 1000);
        assert_eq!(c.sync.strategy, Strategy::Lease, "credit_only defaults to exact leases");
        assert_eq!(c.lease.horizon_ms, 3000);
        assert_eq!(c.response_headers.balance.as_deref(), Some("x-credits-balance"));
        // The rest of the README's configuration reference, default by default.
        assert_eq!(c.subject.require_headers, Vec::<String>::new());
        assert_eq!((c.subject.missing_status, c.subject.unknown_status), (401, 403));
        assert_eq!(c.feature_key, None);
        assert!(c.pricing.units.is_empty());
        assert!(!c.pricing.charge_errors);
        assert_eq!(c.pricing.missing_usage, crate::pricing::MissingUsage::ChargeEstimate);
        assert_eq!(c.pricing.max_body_bytes, 1_048_576);
        assert_eq!(c.pricing.hold_timeout_ms, 600_000);
        assert_eq!((c.sync.max_stale_ms, c.sync.idle_ms), (60_000, 300_000));
        assert_eq!((c.sync.max_unsent_calls, c.sync.unknown_ttl_ms), (1_000_000, 10_000));
        assert_eq!((c.lease.min_calls, c.lease.max_calls, c.lease.low_water_percent), (10, 100_000, 50));
        assert_eq!((c.lease.idle_release_ms, c.lease.ttl_ms), (300_000, 30_000));
        assert_eq!(c.offline_allowance, None);
        assert_eq!(c.response_headers.cost.as_deref(), Some("x-credits-cost"));
        // Only `credit_only` needs exact leases; `credit_then_invoice` never refuses, so caches.
        let invoiced = FilterConfig::parse(
            br#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1", "currency": "USD", "settlement_mode": "credit_then_invoice"}"#,
        )
        .unwrap();
        assert_eq!(invoiced.sync.strategy, Strategy::Cached);
    }

    /// One JSON value, as the schema validates one: whatever follows it is refused.
    #[test]
    fn nothing_may_follow_the_configuration() {
        assert!(FilterConfig::parse(format!("{MINIMAL}\n").as_bytes()).is_ok());
        for trailing in ["{}", "x", ",", "]"] {
            let err = FilterConfig::parse(format!("{MINIMAL} {trailing}").as_bytes()).unwrap_err();
            assert_eq!(err.field, "configuration", "{trailing}: {err}");
        }
    }

    /// Kong's validator takes a number without a fraction for an integer, `-0` too where 0 is
    /// allowed, and cjson hands `-0` over as it is.
    #[test]
    fn a_number_without_a_fraction_is_a_whole_number_minus_zero_too() {
        let with = |ttl: &str| {
            let text = format!(
                r#"{{"ledger": {{"upstream": "l", "token": "t"}}, "price": "1", "currency": "USD", "sync": {{"unknown_ttl_ms": {ttl}}}}}"#
            );
            FilterConfig::parse(text.as_bytes())
        };
        for (whole, ttl) in [("-0", 0), ("-0.0", 0), ("0", 0), ("0.0e0", 0), ("1e3", 1000), ("2500.0", 2500)] {
            assert_eq!(with(whole).map(|c| c.sync.unknown_ttl_ms), Ok(ttl), "{whole}");
        }
        for refused in ["-1", "0.5", "-0.5", "1e-9", "-1e3", "1e300"] {
            assert_eq!(with(refused).map(|_| ()).unwrap_err().field, "sync.unknown_ttl_ms", "{refused}");
        }
    }

    #[test]
    fn the_lease_ttl_floor_follows_the_sync_interval_and_timeout() {
        let with = |extra: &str| {
            FilterConfig::parse(
                format!(r#"{{"ledger": {{"upstream": "l", "token": "t"}}, "price": "1", "currency": "USD", {extra}}}"#)
                    .as_bytes(),
            )
        };
        // Defaults: interval 1000, timeout 1000, so the floor is 6000.
        assert_eq!(with(r#""lease": {"ttl_ms": 6000}"#).unwrap().lease.ttl_ms, 6000);
        let err = with(r#""sync": {"interval_ms": 2000}, "lease": {"ttl_ms": 6000}"#).unwrap_err();
        assert_eq!(err.field, "lease.ttl_ms");
        assert!(err.to_string().contains("9000"), "{err}");
        // The floor binds only when leases are used.
        assert!(with(r#""sync": {"strategy": "cached"}, "lease": {"ttl_ms": 1000}"#).is_ok());
        // Equal bounds are a fixed lease size.
        assert!(with(r#""lease": {"min_calls": 10, "max_calls": 10}"#).is_ok());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1e3", "currency": "USD"}"#, "price"),
            (r#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1", "currency": "usd"}"#, "currency"),
            (
                r#"{"ledger": {"upstream": "l", "token": "t", "timeout_ms": 0}, "price": "1", "currency": "USD"}"#,
                "ledger.timeout_ms",
            ),
            (
                r#"{"ledger": {"upstream": "l", "token": "t", "colour": 1}, "price": "1", "currency": "USD"}"#,
                "ledger.colour",
            ),
            (r#"{"ledger": {"upstream": "l"}, "price": "1", "currency": "USD"}"#, "ledger.token"),
            (r#"{"ledger": {"upstream": "l", "token": "t"}, "price": 1, "currency": "USD"}"#, "price"),
            (
                r#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1", "currency": "USD", "failure_mode": "maybe"}"#,
                "failure_mode",
            ),
            (r#"{"ledger": {"upstream": "l", "token": "t"}, "currency": "USD"}"#, "price"),
            // Cross-field rules: a lease range that cannot exist, a lease TTL too short to spend.
            (
                r#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1", "currency": "USD", "lease": {"min_calls": 11, "max_calls": 10}}"#,
                "lease.min_calls",
            ),
            (
                r#"{"ledger": {"upstream": "l", "token": "t"}, "price": "1", "currency": "USD", "lease": {"ttl_ms": 5999}}"#,
                "lease.ttl_ms",
            ),
        ];
        for (json, field) in cases {
            let err = FilterConfig::parse(json.as_bytes()).unwrap_err();
            assert_eq!(err.field, field, "{json}: {err}");
        }
    }
}
