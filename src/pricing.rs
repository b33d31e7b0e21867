//! How a call is priced: a fixed price per call, plus units the call itself reports — AI tokens
//! in and out, bytes, rows — each with a unit price and the feature its credit must cover.
//!
//! A call is priced twice. Before it goes upstream it holds an estimate ([`quote`]); when its
//! response is complete it costs what it actually used ([`cost`]) and the difference goes
//! back. Each price lands in a *scope* (a feature key, or none): the node keeps one balance (and
//! one lease) per customer and scope, because credit restricted to `output_tokens` cannot pay for
//! `input_tokens`.

use credits::limits::MAX_AMOUNT_SCALE;
use credits::{Amount, FeatureKey};
use rust_decimal::RoundingStrategy;
use serde::Deserialize;

use crate::fields::{
    amount, bounded, error, header_name, list, object, present, some_object, whole, written_within, ConfigError, Object,
};

/// Where a unit count comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitSource {
    /// A JSON pointer into the response body (e.g. `/usage/prompt_tokens`); for
    /// `text/event-stream` responses, into the last event that has it.
    ResponseJson(String),
    ResponseHeader(String),
    /// Known before the call goes upstream: the hold is the actual price.
    RequestHeader(String),
}

/// What a call holds for a unit before its response tells the real count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Estimate {
    Units(Amount),
    /// A JSON pointer into the request body (e.g. `/max_tokens`), with the count assumed when the
    /// body does not have it.
    RequestJson {
        pointer: String,
        default: Amount,
    },
}

/// What a call whose response did not report its units (missing, unreadable, cut off) is charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingUsage {
    /// What it held: the customer agreed to that much when the call was let through.
    ChargeEstimate,
    ChargeNothing,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitRule {
    pub name: String,
    pub unit_price: Amount,
    pub source: UnitSource,
    pub estimate: Estimate,
    /// Index into [`FilterConfig::scopes`](crate::config::FilterConfig).
    pub scope: usize,
}

/// A balance a call can draw on: credit in one feature's scope (or unrestricted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub feature: Option<FeatureKey>,
    /// What a typical call holds here (the fixed price and the units' default estimates): leases
    /// are sized in these.
    pub typical: Amount,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pricing {
    pub units: Vec<UnitRule>,
    /// The scope the fixed `price` is charged in; `None` when the price is zero and units price
    /// the call.
    pub fixed_scope: Option<usize>,
    pub scopes: Vec<Scope>,
    /// Charge calls the upstream answered with 4xx or 5xx (and calls with no response).
    pub charge_errors: bool,
    pub missing_usage: MissingUsage,
    /// Most of a body the filter reads (request body for estimates; a JSON response for units; one
    /// event of a stream). The body itself always passes through whole.
    pub max_body_bytes: usize,
    /// A hold not released within this long (its worker went away) stops counting.
    pub hold_timeout_ms: u64,
}

impl Pricing {
    pub fn needs_request_body(&self) -> bool {
        self.units.iter().any(|u| matches!(u.estimate, Estimate::RequestJson { .. }))
    }

    /// The request headers rules read.
    pub fn request_headers(&self) -> impl Iterator<Item = &str> {
        self.units.iter().filter_map(|u| match &u.source {
            UnitSource::RequestHeader(name) => Some(name.as_str()),
            _ => None,
        })
    }

    pub fn needs_response_body(&self) -> bool {
        self.units.iter().any(|u| matches!(u.source, UnitSource::ResponseJson(_)))
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPricing {
    #[serde(default, deserialize_with = "list")]
    units: Vec<Object<RawUnit>>,
    #[serde(default, deserialize_with = "present")]
    charge_errors: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    missing_usage: Option<String>,
    #[serde(default, deserialize_with = "whole")]
    max_body_bytes: Option<u64>,
    #[serde(default, deserialize_with = "whole")]
    hold_timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnit {
    name: String,
    unit_price: String,
    #[serde(default, deserialize_with = "present")]
    feature_key: Option<String>,
    #[serde(deserialize_with = "object")]
    source: RawSource,
    #[serde(default, deserialize_with = "some_object")]
    estimate: Option<RawEstimate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    #[serde(default, deserialize_with = "present")]
    response_json: Option<String>,
    #[serde(default, deserialize_with = "present")]
    response_header: Option<String>,
    #[serde(default, deserialize_with = "present")]
    request_header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEstimate {
    #[serde(default, deserialize_with = "present")]
    units: Option<String>,
    #[serde(default, deserialize_with = "present")]
    request_json: Option<String>,
    #[serde(default, deserialize_with = "present")]
    default_units: Option<String>,
}

impl RawPricing {
    pub(crate) fn has_units(&self) -> bool {
        !self.units.is_empty()
    }
}

/// The largest count a call may report (larger ones are treated as unreadable).
pub const MAX_COUNT: u64 = 1_000_000_000_000;

/// A count written as a decimal: `42`, `0.5`; not negative, not above [`MAX_COUNT`].
pub fn count_from_text(text: &str) -> Option<Amount> {
    let n = Amount::parse(text.trim()).ok()?;
    (!n.is_negative() && n.decimal() <= MAX_COUNT.into()).then_some(n)
}

/// A count as a JSON number or a string holding one.
pub fn count_from_json(value: &serde_json::Value) -> Option<Amount> {
    match value {
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(u) => (u <= MAX_COUNT).then(|| Amount::from(u)),
            // Floats print without an exponent in Rust; NaN and infinities are not JSON numbers.
            None => n.as_f64().and_then(|f| count_from_text(&f.to_string())),
        },
        serde_json::Value::String(s) => count_from_text(s),
        _ => None,
    }
}

pub const MAX_UNITS: usize = 8;
pub const MAX_UNIT_PRICE: u32 = 1_000_000;
/// Unit prices go up to [`MAX_UNIT_PRICE`], 10^6.
const UNIT_PRICE_DIGITS: usize = 6;
/// Counts configured go up to [`MAX_COUNT`], 10^12, with at most 16 decimal places.
const COUNT_DIGITS: usize = 12;
const COUNT_PLACES: usize = 16;

/// Printable ASCII (a space or a visible character), 1 to `max` of them: only there do Kong's
/// validators count and class characters as the filter does. Its PCRE matches bytes, and
/// lua-resty-ljsonschema's `maxLength` counts bytes before 1.2.0 (Kong 3.5–3.8) and characters
/// from 1.2.0 (Kong 3.9). No control character: PCRE's `.` stops at a newline, and no usage
/// report has a key with one.
fn printable(text: &str, max: usize) -> bool {
    (1..=max).contains(&text.len()) && text.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
}

fn pointer(field: &str, p: &str) -> Result<String, ConfigError> {
    if p.starts_with('/') && printable(p, 256) {
        Ok(p.to_owned())
    } else {
        Err(error(
            field,
            format!("{p:?} is not a JSON pointer of up to 256 printable ASCII characters (e.g. /usage/prompt_tokens)"),
        ))
    }
}

/// A count as the schema writes it; counts read at run time are read leniently
/// ([`count_from_text`]).
fn units(field: &str, text: &str) -> Result<Amount, ConfigError> {
    count_from_text(text).filter(|_| written_within(text, COUNT_DIGITS, COUNT_PLACES)).ok_or_else(|| {
        error(field, format!("{text:?} is not a count from 0 to {MAX_COUNT} with at most {COUNT_PLACES} places"))
    })
}

fn feature(field: &str, key: Option<&str>) -> Result<Option<FeatureKey>, ConfigError> {
    key.map(FeatureKey::parse).transpose().map_err(|e| error(field, e.to_string()))
}

/// The scope of `feature`, added if new.
fn scope_of(scopes: &mut Vec<Scope>, feature: Option<FeatureKey>) -> usize {
    match scopes.iter().position(|s| s.feature == feature) {
        Some(i) => i,
        None => {
            scopes.push(Scope { feature, typical: Amount::ZERO });
            scopes.len() - 1
        }
    }
}

pub(crate) fn parse(raw: RawPricing, price: Amount, fixed_feature: Option<FeatureKey>) -> Result<Pricing, ConfigError> {
    if raw.units.len() > MAX_UNITS {
        return Err(error("pricing.units", format!("at most {MAX_UNITS} unit rules")));
    }
    let mut scopes = Vec::new();
    let fixed_scope = (!price.is_zero() || raw.units.is_empty()).then(|| scope_of(&mut scopes, fixed_feature));
    if let Some(i) = fixed_scope {
        scopes[i].typical = price;
    }
    let mut rules = Vec::with_capacity(raw.units.len());
    for (i, Object(u)) in raw.units.into_iter().enumerate() {
        let at = |name: &str| format!("pricing.units[{i}].{name}");
        if !printable(&u.name, 64) || rules.iter().any(|r: &UnitRule| r.name == u.name) {
            return Err(error(&at("name"), "must be a unique name of 1..64 printable ASCII characters"));
        }
        let unit_price = amount(&at("unit_price"), &u.unit_price, UNIT_PRICE_DIGITS)?;
        let s = u.source;
        let source = match (s.response_json, s.response_header, s.request_header) {
            (Some(p), None, None) => UnitSource::ResponseJson(pointer(&at("source.response_json"), &p)?),
            (None, Some(h), None) => UnitSource::ResponseHeader(header_name(&at("source.response_header"), &h)?),
            (None, None, Some(h)) => UnitSource::RequestHeader(header_name(&at("source.request_header"), &h)?),
            _ => {
                return Err(error(&at("source"), "give exactly one of response_json, response_header, request_header"))
            }
        };
        let estimate = match u.estimate {
            None => Estimate::Units(Amount::ZERO),
            Some(RawEstimate { units: Some(n), request_json: None, default_units: None }) => {
                Estimate::Units(units(&at("estimate.units"), &n)?)
            }
            Some(RawEstimate { units: None, request_json: Some(p), default_units }) => Estimate::RequestJson {
                pointer: pointer(&at("estimate.request_json"), &p)?,
                default: units(&at("estimate.default_units"), default_units.as_deref().unwrap_or("0"))?,
            },
            Some(_) => return Err(error(&at("estimate"), "give units, or request_json (with optional default_units)")),
        };
        let scope = scope_of(&mut scopes, feature(&at("feature_key"), u.feature_key.as_deref())?);
        let default_units = match &estimate {
            Estimate::Units(n) | Estimate::RequestJson { default: n, .. } => *n,
        };
        let typical = unit_cost(unit_price, default_units)
            .ok_or_else(|| error(&at("unit_price"), "unit_price × estimate is too large"))?;
        scopes[scope].typical = scopes[scope]
            .typical
            .checked_add(typical)
            .map(places_needed)
            .and_then(|t| t.bounded().ok())
            .ok_or_else(|| {
                let why = "unit_price × estimate must be at most 10^15 with at most 9 decimal places (the ledger's precision)";
                error(&at("unit_price"), why)
            })?;
        rules.push(UnitRule { name: u.name, unit_price, source, estimate, scope });
    }
    let missing_usage = match raw.missing_usage.as_deref().unwrap_or("charge_estimate") {
        "charge_estimate" => MissingUsage::ChargeEstimate,
        "charge_nothing" => MissingUsage::ChargeNothing,
        other => {
            return Err(error("pricing.missing_usage", format!("{other:?} is not charge_estimate or charge_nothing")))
        }
    };
    let max_body_bytes = bounded("pricing.max_body_bytes", raw.max_body_bytes, 1 << 20, 1024, 64 << 20)?;
    Ok(Pricing {
        units: rules,
        fixed_scope,
        scopes,
        charge_errors: raw.charge_errors.unwrap_or(false),
        missing_usage,
        max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
        hold_timeout_ms: bounded("pricing.hold_timeout_ms", raw.hold_timeout_ms, 600_000, 1_000, 86_400_000)?,
    })
}

/// `amount` without the trailing zeros that take it beyond the ledger's 9 places: a product keeps
/// the places of both factors (`0.000008 × 1024.0000` has 10), which the schema cannot see.
fn places_needed(amount: Amount) -> Amount {
    if amount.decimal().scale() > MAX_AMOUNT_SCALE {
        Amount::new(amount.decimal().normalize())
    } else {
        amount
    }
}

/// `units × unit_price`, exact; `None` when that needs more places than a decimal has.
pub fn unit_cost(unit_price: Amount, units: Amount) -> Option<Amount> {
    unit_price.checked_mul(units.decimal())
}

/// What `units` at `unit_price` cost a call, to the ledger's 9 decimal places, rounded half to
/// even. The configuration refuses estimates priced beyond 9 places, but counts read at run time
/// (a fractional count in a response or a request body) may have any number: priced exactly, the
/// ledger could not book them. Half to even drifts neither up nor down over many calls.
fn billed(unit_price: Amount, units: Amount) -> Amount {
    // Cannot overflow: unit prices are at most MAX_UNIT_PRICE and counts at most `MAX_COUNT`, so
    // a rule costs at most 10^18. A product beyond a decimal's 28 places is rounded there first.
    let cost = unit_price.decimal().checked_mul(units.decimal()).unwrap_or_default();
    Amount::new(cost.round_dp_with_strategy(MAX_AMOUNT_SCALE, RoundingStrategy::MidpointNearestEven))
}

/// What a call holds before it goes upstream, per scope, and the units each rule assumed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    pub estimates: Vec<Amount>,
    /// Per rule: the count the hold assumed, and whether it is final (a request header).
    pub units: Vec<(Amount, bool)>,
}

/// Prices a call before its response: `header` reads a request header, `body` is the request
/// body when a rule estimates from it (`None` when absent or too large: defaults apply).
pub fn quote(pricing: &Pricing, price: Amount, header: &dyn Fn(&str) -> Option<String>, body: Option<&[u8]>) -> Quote {
    let body: Option<serde_json::Value> =
        if pricing.needs_request_body() { body.and_then(|b| serde_json::from_slice(b).ok()) } else { None };
    let units: Vec<(Amount, bool)> = pricing
        .units
        .iter()
        .map(|rule| {
            if let UnitSource::RequestHeader(name) = &rule.source {
                if let Some(n) = header(name).as_deref().and_then(count_from_text) {
                    return (n, true);
                }
            }
            let estimate = match &rule.estimate {
                Estimate::Units(n) => *n,
                Estimate::RequestJson { pointer, default } => {
                    body.as_ref().and_then(|v| v.pointer(pointer)).and_then(count_from_json).unwrap_or(*default)
                }
            };
            (estimate, false)
        })
        .collect();
    let amounts: Vec<Amount> = units.iter().map(|(n, _)| *n).collect();
    let typical: Vec<Amount> = pricing.scopes.iter().map(|s| s.typical).collect();
    Quote { estimates: bounded_per_scope(pricing, price, &amounts, &typical), units }
}

/// [`per_scope`], where a scope whose amount would exceed what the ledger books in one piece
/// (`credits::limits::MAX_AMOUNT`: counts far beyond any real call) takes `fallback` instead.
fn bounded_per_scope(pricing: &Pricing, price: Amount, units: &[Amount], fallback: &[Amount]) -> Vec<Amount> {
    let amounts = per_scope(pricing, price, units);
    amounts.into_iter().zip(fallback).map(|(a, f)| if a.bounded().is_ok() { a } else { *f }).collect()
}

/// Per scope: the fixed price plus each rule's units at its price.
fn per_scope(pricing: &Pricing, price: Amount, units: &[Amount]) -> Vec<Amount> {
    let mut amounts = vec![Amount::ZERO; pricing.scopes.len()];
    if let Some(i) = pricing.fixed_scope {
        amounts[i] = price;
    }
    for (rule, n) in pricing.units.iter().zip(units) {
        amounts[rule.scope] += billed(rule.unit_price, *n);
    }
    amounts
}

/// When a call let through pays its price.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charging {
    /// It holds its estimate until its response says what it costs.
    AtCompletion,
    /// Its price is known before it goes upstream: it is charged then, and its completion writes
    /// nothing (one shared-data update per call instead of two) unless its response makes it
    /// cost less — an upstream error, free unless `pricing.charge_errors` — and it is refunded.
    AtAdmission,
}

/// When a call quoted at `quote` pays: at admission when its response can change the price only
/// by making it free (every unit count came from a request header), and the price is in one
/// scope — a call refused in a later scope gives back what the earlier ones took, which a charge
/// already on its way to the ledger could not be.
pub fn charging(pricing: &Pricing, quote: &Quote) -> Charging {
    let is_final = quote.units.iter().all(|(_, is_final)| *is_final);
    if is_final && pricing.scopes.len() == 1 {
        Charging::AtAdmission
    } else {
        Charging::AtCompletion
    }
}

/// What the call costs now that its response is complete: `status` is the upstream's (`None`:
/// no response), `observed` the units the response reported per rule (`None`: not reported).
pub fn cost(
    pricing: &Pricing,
    price: Amount,
    quote: &Quote,
    status: Option<u16>,
    observed: &[Option<Amount>],
) -> Vec<Amount> {
    let failed = status.is_none_or(|s| s >= 400);
    if failed && !pricing.charge_errors {
        return vec![Amount::ZERO; pricing.scopes.len()];
    }
    let units: Vec<Amount> = quote
        .units
        .iter()
        .zip(observed)
        .map(|((estimate, is_final), seen)| match (is_final, seen) {
            (true, _) => *estimate,
            (false, Some(n)) => *n,
            (false, None) => match pricing.missing_usage {
                MissingUsage::ChargeEstimate => *estimate,
                MissingUsage::ChargeNothing => Amount::ZERO,
            },
        })
        .collect();
    bounded_per_scope(pricing, price, &units, &quote.estimates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FilterConfig;

    fn amt(s: &str) -> Amount {
        Amount::parse(s).unwrap()
    }

    fn ai() -> FilterConfig {
        let json = r#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0.001", "currency": "USD",
            "feature_key": "api_requests",
            "pricing": {"units": [
                {"name": "input", "feature_key": "input_tokens", "unit_price": "0.000002",
                 "source": {"response_json": "/usage/prompt_tokens"}, "estimate": {"units": "500"}},
                {"name": "output", "feature_key": "output_tokens", "unit_price": "0.000008",
                 "source": {"response_json": "/usage/completion_tokens"},
                 "estimate": {"request_json": "/max_tokens", "default_units": "1000"}}
            ]}}"#;
        FilterConfig::parse(json.as_bytes()).unwrap()
    }

    #[test]
    fn counts_are_non_negative_decimals_in_bounds() {
        assert_eq!(count_from_text(" 42 "), Some(amt("42")));
        assert_eq!(count_from_text("0.5"), Some(amt("0.5")));
        for bad in ["-1", "1e3", "", "NaN", "ten", "1000000000001"] {
            assert_eq!(count_from_text(bad), None, "{bad}");
        }
        assert_eq!(count_from_json(&serde_json::json!(7)), Some(amt("7")));
        assert_eq!(count_from_json(&serde_json::json!(2.5)), Some(amt("2.5")));
        assert_eq!(count_from_json(&serde_json::json!("12")), Some(amt("12")));
        for bad in [serde_json::json!(-3), serde_json::json!(null), serde_json::json!([1]), serde_json::json!(1e300)] {
            assert_eq!(count_from_json(&bad), None, "{bad}");
        }
    }

    fn no_header(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn each_feature_gets_its_own_scope_sized_by_its_typical_call() {
        let c = ai();
        let p = &c.pricing;
        let features: Vec<_> = p.scopes.iter().map(|s| s.feature.as_ref().map(|f| f.as_str().to_owned())).collect();
        assert_eq!(
            features,
            [Some("api_requests".to_owned()), Some("input_tokens".to_owned()), Some("output_tokens".to_owned())]
        );
        let typical: Vec<_> = p.scopes.iter().map(|s| s.typical).collect();
        assert_eq!(typical, [amt("0.001"), amt("0.001"), amt("0.008")]);
        assert!(p.needs_request_body() && p.needs_response_body());
    }

    #[test]
    fn the_estimate_comes_from_the_request_body_or_its_default() {
        let c = ai();
        let q = quote(&c.pricing, c.price, &no_header, Some(br#"{"model": "m", "max_tokens": 200}"#));
        assert_eq!(q.estimates, [amt("0.001"), amt("0.001"), amt("0.0016")]);
        let q = quote(&c.pricing, c.price, &no_header, Some(b"not json"));
        assert_eq!(q.estimates[2], amt("0.008"));
        let q = quote(&c.pricing, c.price, &no_header, None);
        assert_eq!(q.estimates[2], amt("0.008"));
    }

    #[test]
    fn a_call_costs_what_it_used_and_nothing_for_upstream_errors() {
        let c = ai();
        let q = quote(&c.pricing, c.price, &no_header, Some(br#"{"max_tokens": 200}"#));
        let used = cost(&c.pricing, c.price, &q, Some(200), &[Some(amt("120")), Some(amt("350"))]);
        // More output than estimated is still charged.
        assert_eq!(used, [amt("0.001"), amt("0.00024"), amt("0.0028")]);
        let failed = cost(&c.pricing, c.price, &q, Some(503), &[Some(amt("120")), None]);
        assert!(failed.iter().all(|a| a.is_zero()));
        assert!(cost(&c.pricing, c.price, &q, None, &[None, None]).iter().all(|a| a.is_zero()));
        // Missing usage: the estimate by default.
        let missing = cost(&c.pricing, c.price, &q, Some(200), &[None, None]);
        assert_eq!(missing, q.estimates);
    }

    /// Counts read at run time may be fractional with any number of places: each rule's cost is
    /// what the ledger books (9 places, half to even), never the estimate and never free.
    #[test]
    fn a_fractional_count_is_billed_to_the_ledgers_nine_places_half_to_even() {
        let c = ai();
        let q = quote(&c.pricing, c.price, &no_header, Some(br#"{"max_tokens": 200}"#));
        let billed = |input: &str, output: &str| {
            let used = cost(&c.pricing, c.price, &q, Some(200), &[Some(amt(input)), Some(amt(output))]);
            used.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        // 0.000002 × 1.25 is booked as it is; 0.000008 × 0.0000000625 is 0.0000000000000005.
        assert_eq!(billed("1.25", "0.0000000625"), ["0.001", "0.00000250", "0.000000000"]);
        // Half to even at the ninth place: 0.0000000025 goes down, 0.0000000015 up.
        assert_eq!(billed("0.00125", "0.0001875"), ["0.001", "0.000000002", "0.000000002"]);
        // A count with more places than a product can hold exactly is still billed.
        let long = "0.1234567890123456789012345";
        assert_eq!(billed(long, long), ["0.001", "0.000000247", "0.000000988"]);
    }

    #[test]
    fn errors_are_charged_when_configured_and_missing_usage_can_cost_nothing() {
        let json = r#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0", "currency": "USD",
            "pricing": {"charge_errors": true, "missing_usage": "charge_nothing", "units": [
                {"name": "rows", "unit_price": "0.01", "source": {"response_header": "x-rows"}, "estimate": {"units": "10"}},
                {"name": "size", "unit_price": "0.5", "source": {"request_header": "x-size"}}
            ]}}"#;
        let c = FilterConfig::parse(json.as_bytes()).unwrap();
        assert_eq!(c.pricing.fixed_scope, None, "a zero price with units has no fixed scope");
        assert_eq!(c.pricing.scopes.len(), 1, "both rules are unrestricted: one scope");
        let header = |name: &str| (name == "x-size").then(|| "3".to_owned());
        let q = quote(&c.pricing, c.price, &header, None);
        assert_eq!(q.estimates, [amt("1.60")]);
        assert_eq!(cost(&c.pricing, c.price, &q, Some(500), &[Some(amt("2")), None]), [amt("1.52")]);
        assert_eq!(cost(&c.pricing, c.price, &q, Some(200), &[None, None]), [amt("1.5")]);
    }

    fn parsed(pricing: &str, price: &str) -> FilterConfig {
        let json = format!(
            r#"{{"ledger": {{"upstream": "l", "token": "t"}}, "price": "{price}", "currency": "USD", "pricing": {pricing}}}"#
        );
        FilterConfig::parse(json.as_bytes()).unwrap()
    }

    /// A call is charged at admission only when its response can change its price only by making
    /// it free: every unit count from a request header the call sent (or a fixed price), one scope.
    #[test]
    fn a_call_is_charged_at_admission_only_when_its_response_cannot_change_its_price() {
        let sized = |header: Option<&str>| {
            let header = header.map(str::to_owned);
            move |name: &str| (name == "x-size").then(|| header.clone()).flatten()
        };
        let size = r#"{"name": "size", "unit_price": "0.5", "source": {"request_header": "x-size"}}"#;
        let rows = r#"{"name": "rows", "unit_price": "0.01", "source": {"response_header": "x-rows"}}"#;
        let feature =
            r#"{"name": "size", "feature_key": "bytes", "unit_price": "0.5", "source": {"request_header": "x-size"}}"#;
        let cases = [
            ("{}", Some("3"), Charging::AtAdmission), // the default: a fixed price
            (r#"{"charge_errors": true}"#, None, Charging::AtAdmission),
            (&format!(r#"{{"charge_errors": true, "units": [{size}]}}"#), Some("3"), Charging::AtAdmission),
            // Without its header the count is an estimate, which a missing usage may zero.
            (&format!(r#"{{"charge_errors": true, "units": [{size}]}}"#), None, Charging::AtCompletion),
            (&format!(r#"{{"charge_errors": true, "units": [{size}, {rows}]}}"#), Some("3"), Charging::AtCompletion),
            (&format!(r#"{{"units": [{size}]}}"#), Some("3"), Charging::AtAdmission),
            (&format!(r#"{{"units": [{rows}]}}"#), Some("3"), Charging::AtCompletion),
            // Two scopes: a refusal in the second gives back what the first took.
            (&format!(r#"{{"charge_errors": true, "units": [{feature}]}}"#), Some("3"), Charging::AtCompletion),
        ];
        for (pricing, header, expected) in cases {
            let c = parsed(pricing, "0.10");
            let q = quote(&c.pricing, c.price, &sized(header), None);
            assert_eq!(charging(&c.pricing, &q), expected, "{pricing}, x-size {header:?}");
        }
    }

    proptest::proptest! {
        /// What makes charging at admission exact: a call charged then costs exactly what it was
        /// charged, whatever its response (any status, none, any usage reported), or nothing at
        /// all (an error, unless errors are charged): then all of it is refunded.
        #[test]
        fn a_call_charged_at_admission_costs_what_it_was_charged_whatever_its_response(
            price in 0u64..1_000_000,
            size in proptest::option::of(0u64..1_000_000_000_000),
            status in proptest::option::of(100u16..600),
            reported in proptest::collection::vec(proptest::option::of(0u64..1_000_000), 2),
            charge_nothing in proptest::bool::ANY,
            charge_errors in proptest::bool::ANY,
        ) {
            let missing = if charge_nothing { "charge_nothing" } else { "charge_estimate" };
            let pricing = format!(
                r#"{{"charge_errors": {charge_errors}, "missing_usage": "{missing}", "units": [
                    {{"name": "size", "unit_price": "0.5", "source": {{"request_header": "x-size"}}, "estimate": {{"units": "7"}}}},
                    {{"name": "more", "unit_price": "0.25", "source": {{"request_header": "x-more"}}}}]}}"#
            );
            let c = parsed(&pricing, &format!("{}.{:04}", price / 10_000, price % 10_000));
            let header = |name: &str| match name {
                "x-size" => size.map(|n| n.to_string()),
                "x-more" => Some("2".to_owned()),
                _ => None,
            };
            let q = quote(&c.pricing, c.price, &header, None);
            let observed: Vec<Option<Amount>> = reported.iter().map(|n| n.map(|n| amt(&n.to_string()))).collect();
            proptest::prop_assert_eq!(charging(&c.pricing, &q) == Charging::AtAdmission, size.is_some());
            if size.is_some() {
                let free = status.is_none_or(|s| s >= 400) && !charge_errors;
                let expected = if free { vec![Amount::ZERO; q.estimates.len()] } else { q.estimates.clone() };
                proptest::prop_assert_eq!(cost(&c.pricing, c.price, &q, status, &observed), expected);
            }
        }
    }

    #[test]
    fn a_call_never_costs_more_than_the_ledger_books_in_one_piece() {
        let json = r#"{"ledger": {"upstream": "l", "token": "t"}, "price": "0", "currency": "USD",
            "pricing": {"units": [{"name": "rows", "unit_price": "1000000", "source": {"response_header": "x-rows"},
                "estimate": {"units": "10"}}]}}"#;
        let c = FilterConfig::parse(json.as_bytes()).unwrap();
        let q = quote(&c.pricing, c.price, &no_header, None);
        assert_eq!(q.estimates, [amt("10000000")]);
        // 10^12 rows at a million each is beyond 10^15: charged the estimate instead.
        let reported = [Some(amt("1000000000000"))];
        assert_eq!(cost(&c.pricing, c.price, &q, Some(200), &reported), q.estimates);
        // A typical call beyond the bound is refused when configured.
        let too_much = json.replace(r#""units": "10""#, r#""units": "1000000000000""#);
        let err = FilterConfig::parse(too_much.as_bytes()).unwrap_err();
        assert_eq!(err.field, "pricing.units[0].unit_price", "{err}");
    }

    #[test]
    fn bad_rules_name_their_field() {
        let base = |units: &str| {
            format!(
                r#"{{"ledger": {{"upstream": "l", "token": "t"}}, "price": "0", "currency": "USD", "pricing": {{"units": [{units}]}}}}"#
            )
        };
        let cases = [
            (r#"{"name": "a", "unit_price": "1", "source": {}}"#, "pricing.units[0].source"),
            (
                r#"{"name": "a", "unit_price": "1", "source": {"response_json": "usage"}}"#,
                "pricing.units[0].source.response_json",
            ),
            (r#"{"name": "a", "unit_price": "-1", "source": {"response_header": "x"}}"#, "pricing.units[0].unit_price"),
            (
                r#"{"name": "a", "unit_price": "1", "source": {"response_header": "X-Up"}}"#,
                "pricing.units[0].source.response_header",
            ),
            (
                r#"{"name": "a", "unit_price": "1", "source": {"response_header": "x"}, "estimate": {"units": "1", "request_json": "/n"}}"#,
                "pricing.units[0].estimate",
            ),
            // Kong's schema cannot express uniqueness across array items: the filter refuses it.
            (
                r#"{"name": "tokens", "unit_price": "1", "source": {"response_header": "x"}},
                   {"name": "tokens", "unit_price": "2", "source": {"response_header": "y"}}"#,
                "pricing.units[1].name",
            ),
        ];
        for (unit, field) in cases {
            let err = FilterConfig::parse(base(unit).as_bytes()).unwrap_err();
            assert_eq!(err.field, field, "{unit}: {err}");
        }
    }
}
