#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking
#![allow(clippy::result_large_err)] // the keyword factories return what jsonschema's with_keyword takes
//! The Kong metadata schema and the filter's own parser must agree on every configuration.

use jsonschema::paths::{LazyLocation, Location};
use jsonschema::{Keyword, ValidationError};
use prepaid_credits::config::FilterConfig;
use serde_json::{json, Map, Value};

fn meta() -> Value {
    serde_json::from_str(include_str!("../plugin-schema/prepaid_credits.meta.json")).expect("meta.json is JSON")
}

fn schema() -> jsonschema::Validator {
    jsonschema::draft4::new(&meta()["config_schema"]).expect("config_schema is a valid draft-04 schema")
}

/// The Kong releases whose validators read the schema differently.
#[derive(Clone, Copy, Debug)]
enum Kong {
    /// lua-resty-ljsonschema 1.1.x: `minLength` and `maxLength` count bytes.
    Before3_9,
    /// lua-resty-ljsonschema 1.2.0: they count characters (UTF-8 sequences).
    From3_9,
}

/// The schema as Kong validates a filter's configuration: lua-resty-ljsonschema, called by
/// `kong/db/schema/json.lua` with `array_mt = false`, on the JSON decoded into Lua tables.
/// Emulated keyword by keyword where that differs from the specification:
/// - `pattern` is `ngx.re.find(value, pattern, "jo")`: PCRE without UTF-8 mode, so it matches
///   bytes (`.` and `{m,n}` count bytes, `\s` is ASCII), and `$` also matches before a final
///   newline;
/// - `minLength` and `maxLength` count bytes before Kong 3.9;
/// - an empty table is both an object and an array (`type`, `required`, `minItems`,
///   `minProperties` apply to it either way), and a number without a fraction is an integer.
fn kong(version: Kong) -> jsonschema::Validator {
    let options = jsonschema::draft4::options()
        .with_keyword("pattern", pcre)
        .with_keyword("type", lua_type)
        .with_keyword("required", lua_required)
        .with_keyword("minItems", lua_min_items)
        .with_keyword("minProperties", lua_min_properties);
    let options = match version {
        Kong::Before3_9 => options.with_keyword("minLength", min_bytes).with_keyword("maxLength", max_bytes),
        Kong::From3_9 => options,
    };
    options.build(&meta()["config_schema"]).expect("config_schema compiles as Kong reads it")
}

/// A keyword as Kong's validator reads it.
struct Lua(Box<dyn Fn(&Value) -> bool + Send + Sync>);

impl Keyword for Lua {
    fn validate<'i>(&self, instance: &'i Value, location: &LazyLocation) -> Result<(), ValidationError<'i>> {
        if self.is_valid(instance) {
            Ok(())
        } else {
            Err(ValidationError::custom(Location::new(), location.into(), instance, "refused as Kong validates"))
        }
    }

    fn is_valid(&self, instance: &Value) -> bool {
        (self.0)(instance)
    }
}

type Compiled<'a> = Result<Box<dyn Keyword>, ValidationError<'a>>;

fn lua<'a>(check: impl Fn(&Value) -> bool + Send + Sync + 'static) -> Compiled<'a> {
    Ok(Box::new(Lua(Box::new(check))))
}

fn count(schema: &Value) -> usize {
    schema.as_u64().and_then(|n| usize::try_from(n).ok()).unwrap_or(usize::MAX)
}

fn pcre<'a>(_: &'a Map<String, Value>, schema: &'a Value, _: Location) -> Compiled<'a> {
    let pattern = schema.as_str().unwrap_or_default();
    let pattern = pattern.strip_suffix('$').map_or_else(|| pattern.to_owned(), |body| format!("{body}\\n?$"));
    let re = regex::bytes::Regex::new(&format!("(?-u){pattern}"))
        .map_err(|e| ValidationError::custom(Location::new(), Location::new(), schema, e.to_string()))?;
    lua(move |v| v.as_str().is_none_or(|s| re.is_match(s.as_bytes())))
}

fn lua_type<'a>(_: &'a Map<String, Value>, schema: &'a Value, _: Location) -> Compiled<'a> {
    let types: Vec<String> = match schema {
        Value::Array(types) => types.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        other => other.as_str().map(str::to_owned).into_iter().collect(),
    };
    lua(move |v| {
        types.iter().any(|t| match (t.as_str(), v) {
            ("object", Value::Array(a)) => a.is_empty(),
            ("array", Value::Object(o)) => o.is_empty(),
            ("integer", Value::Number(n)) => n.as_f64().is_some_and(|f| f.fract() == 0.0),
            ("object", Value::Object(_))
            | ("array", Value::Array(_))
            | ("string", Value::String(_))
            | ("boolean", Value::Bool(_))
            | ("number", Value::Number(_))
            | ("null", Value::Null) => true,
            _ => false,
        })
    })
}

fn lua_required<'a>(_: &'a Map<String, Value>, schema: &'a Value, _: Location) -> Compiled<'a> {
    let names: Vec<String> =
        schema.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect();
    lua(move |v| match v {
        Value::Object(o) => names.iter().all(|n| o.contains_key(n)),
        Value::Array(a) if a.is_empty() => names.is_empty(),
        _ => true,
    })
}

fn lua_min_items<'a>(_: &'a Map<String, Value>, schema: &'a Value, _: Location) -> Compiled<'a> {
    let min = count(schema);
    lua(move |v| match v {
        Value::Array(a) => a.len() >= min,
        Value::Object(o) if o.is_empty() => min == 0,
        _ => true,
    })
}

fn lua_min_properties<'a>(_: &'a Map<String, Value>, schema: &'a Value, _: Location) -> Compiled<'a> {
    let min = count(schema);
    lua(move |v| match v {
        Value::Object(o) => o.len() >= min,
        Value::Array(a) if a.is_empty() => min == 0,
        _ => true,
    })
}

fn min_bytes<'a>(_: &'a Map<String, Value>, schema: &'a Value, _: Location) -> Compiled<'a> {
    let min = count(schema);
    lua(move |v| v.as_str().is_none_or(|s| s.len() >= min))
}

fn max_bytes<'a>(_: &'a Map<String, Value>, schema: &'a Value, _: Location) -> Compiled<'a> {
    let max = count(schema);
    lua(move |v| v.as_str().is_none_or(|s| s.len() <= max))
}

/// The configuration as Kong hands it to the filter: encoded again by cjson from the Lua tables
/// (`kong/runloop/wasm.lua`), so a number without a fraction comes as an integer, and an empty
/// array, a table like an empty object, may come as `{}` (`empty_as_object`). cjson writes a
/// negative zero as `-0`, which JSON parsers read back as the float it is.
fn as_kong_sends(v: &Value, empty_as_object: bool) -> Value {
    match v {
        Value::Number(n) if !n.is_u64() && !n.is_i64() => match n.as_f64() {
            Some(f) if f == 0.0 && f.is_sign_negative() => v.clone(),
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => json!(f as i64),
            _ => v.clone(),
        },
        Value::Array(a) if a.is_empty() && empty_as_object => json!({}),
        Value::Array(a) => Value::Array(a.iter().map(|x| as_kong_sends(x, empty_as_object)).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, x)| (k.clone(), as_kong_sends(x, empty_as_object))).collect())
        }
        _ => v.clone(),
    }
}

fn base() -> Value {
    json!({"ledger": {"upstream": "ledger", "token": "secret"}, "price": "0.01", "currency": "USD"})
}

/// `base()` with one member (a `/`-separated path) set or, with `None`, removed.
fn with(path: &str, value: Option<Value>) -> Value {
    let mut config = base();
    let mut target = &mut config;
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        let object = target.as_object_mut().expect("object");
        target = object.entry(part.to_string()).or_insert_with(|| json!({}));
    }
    let last = parts[parts.len() - 1];
    let object = target.as_object_mut().expect("object");
    match value {
        Some(v) => {
            object.insert(last.to_owned(), v);
        }
        None => {
            object.remove(last);
        }
    }
    config
}

fn corpus() -> Vec<(Value, bool)> {
    let mut cases = vec![(base(), true)];
    let valid = [
        ("ledger/authority", json!("ledger.internal")),
        ("ledger/base_path", json!("/")),
        ("ledger/base_path", json!("/api/v3")),
        ("ledger/timeout_ms", json!(1)),
        ("ledger/tls", json!(true)),
        ("ledger/timeout_ms", json!(60000)),
        ("ledger/upstream", json!("127.0.0.1:8480")),
        ("subject/header", json!("x-credential-identifier")),
        ("subject/require_headers", json!(["x-credential-identifier"])),
        ("subject/require_headers", json!([])),
        ("subject/missing_status", json!(403)),
        ("subject/unknown_status", json!(404)),
        ("price", json!("0")),
        ("price", json!("12.3456789")),
        // The amount bound every edge enforces (credits::limits): 10^15, nine decimal places.
        ("price", json!("1000000000000000")),
        ("price", json!("0.000000001")),
        ("currency", json!("EUR")),
        ("feature_key", json!("api_requests")),
        ("settlement_mode", json!("credit_then_invoice")),
        ("sync/strategy", json!("cached")),
        ("sync/strategy", json!("lease")),
        ("lease/min_calls", json!(1)),
        ("lease/max_calls", json!(1000000)),
        ("lease/low_water_percent", json!(100)),
        ("lease/horizon_ms", json!(5000)),
        ("lease/idle_release_ms", json!(100)),
        ("lease/ttl_ms", json!(6000)),
        ("lease", json!({})),
        ("sync/interval_ms", json!(50)),
        ("sync/max_stale_ms", json!(100)),
        ("sync/idle_ms", json!(86400000)),
        ("sync/max_unsent_calls", json!(1)),
        ("sync/unknown_ttl_ms", json!(0)),
        ("failure_mode", json!("allow")),
        ("offline_allowance", json!("5.00")),
        ("response_headers/balance", json!(null)),
        ("response_headers/cost", json!("x-cost")),
        ("sync", json!({})),
        ("subject", json!({})),
        // As many digits as the schema's pattern allows, leading zeros included.
        ("price", json!("000000000000001")),
        ("ledger/upstream", json!("[::1]:8480")),
        ("ledger/base_path", json!("/v3/a~b%20c")),
    ];
    let invalid = [
        ("ledger/upstream", Some(json!(""))),
        ("ledger/upstream", Some(json!("led ger"))),
        ("ledger/authority", Some(json!(""))),
        ("ledger/base_path", Some(json!("v3"))),
        ("ledger/base_path", Some(json!("/v3/"))),
        ("ledger/base_path", Some(json!("//v3"))),
        ("ledger/base_path", Some(json!("/v3?x=1"))),
        // A control character goes into the :path of every sync: nothing may reach the ledger.
        ("ledger/base_path", Some(json!("/v3\r\nx-forwarded-for:1.2.3.4"))),
        ("ledger/base_path", Some(json!("/v\t3"))),
        ("ledger/token", Some(json!(""))),
        ("ledger/token", Some(json!("a\nb"))),
        ("ledger/timeout_ms", Some(json!(0))),
        ("ledger/timeout_ms", Some(json!(60001))),
        ("ledger/timeout_ms", Some(json!("1000"))),
        ("ledger/timeout_ms", Some(json!(-5))),
        ("ledger/extra", Some(json!(1))),
        ("ledger/tls", Some(json!("yes"))),
        ("ledger/token", None),
        ("ledger/upstream", None),
        ("subject/header", Some(json!("X-Consumer"))),
        ("subject/header", Some(json!(""))),
        ("subject/require_headers", Some(json!(["X-Credential"]))),
        ("subject/require_headers", Some(json!("x-credential-identifier"))),
        ("subject/require_headers", Some(json!(["a", "b", "c", "d", "e", "f", "g", "h", "i"]))),
        ("subject/missing_status", Some(json!(200))),
        ("subject/unknown_status", Some(json!(500))),
        ("subject/unknown", Some(json!(true))),
        ("price", Some(json!("1e3"))),
        ("price", Some(json!("1,5"))),
        ("price", Some(json!("-1"))),
        ("price", Some(json!("NaN"))),
        ("price", Some(json!("1000000000000001"))),
        ("price", Some(json!("0.0000000001"))),
        ("offline_allowance", Some(json!("99999999999999999"))),
        ("price", Some(json!(""))),
        ("price", Some(json!(0.01))),
        ("price", None),
        ("currency", Some(json!("usd"))),
        ("currency", Some(json!("US"))),
        ("currency", Some(json!("USDT"))),
        ("currency", None),
        ("feature_key", Some(json!("Api"))),
        ("feature_key", Some(json!("a__b"))),
        ("feature_key", Some(json!("x".repeat(65)))),
        ("settlement_mode", Some(json!("invoice"))),
        ("sync/strategy", Some(json!("psychic"))),
        ("lease/min_calls", Some(json!(0))),
        ("lease/max_calls", Some(json!(1000001))),
        ("lease/low_water_percent", Some(json!(101))),
        ("lease/horizon_ms", Some(json!(0))),
        ("lease/idle_release_ms", Some(json!(99))),
        ("lease/ttl_ms", Some(json!(999))),
        ("lease/other", Some(json!(1))),
        ("sync/interval_ms", Some(json!(49))),
        ("sync/max_stale_ms", Some(json!(99))),
        ("sync/idle_ms", Some(json!(999))),
        ("sync/max_unsent_calls", Some(json!(0))),
        ("sync/max_unsent_calls", Some(json!(1000001))),
        ("sync/unknown_ttl_ms", Some(json!(3600001))),
        ("sync/other", Some(json!(1))),
        ("failure_mode", Some(json!("open"))),
        ("offline_allowance", Some(json!("-1"))),
        ("offline_allowance", Some(json!(5))),
        ("response_headers/balance", Some(json!("X-Balance"))),
        ("response_headers/other", Some(json!("x"))),
        ("colour", Some(json!("blue"))),
        ("ledger", Some(json!("ledger:8480"))),
        // Kong's PCRE matches bytes: a multi-byte space is no `\s` there, and `{1,256}` counts
        // bytes. Only visible ASCII reads alike everywhere.
        ("ledger/upstream", Some(json!("ledger\u{a0}internal"))),
        ("ledger/upstream", Some(json!("é".repeat(200)))),
        ("ledger/authority", Some(json!("ledger\u{1}internal"))),
        ("ledger/base_path", Some(json!("/v\u{85}3"))),
        ("ledger/base_path", Some(json!("/v\u{80}3"))),
        ("ledger/base_path", Some(json!("/é"))),
        // More digits than the schema's pattern allows, even as leading zeros.
        ("price", Some(json!("0000000000000001"))),
        ("offline_allowance", Some(json!("0000000000000000"))),
        // The schema makes only response_headers.* nullable; Kong adds no null for a member left
        // out (the configuration is a JSON field it passes on as written).
        ("ledger/authority", Some(Value::Null)),
        ("ledger/base_path", Some(Value::Null)),
        ("ledger/timeout_ms", Some(Value::Null)),
        ("ledger/tls", Some(Value::Null)),
        ("subject", Some(Value::Null)),
        ("subject/header", Some(Value::Null)),
        ("subject/require_headers", Some(Value::Null)),
        ("subject/missing_status", Some(Value::Null)),
        ("subject/unknown_status", Some(Value::Null)),
        ("feature_key", Some(Value::Null)),
        ("settlement_mode", Some(Value::Null)),
        ("pricing", Some(Value::Null)),
        ("pricing/charge_errors", Some(Value::Null)),
        ("pricing/missing_usage", Some(Value::Null)),
        ("pricing/max_body_bytes", Some(Value::Null)),
        ("pricing/hold_timeout_ms", Some(Value::Null)),
        ("sync/strategy", Some(Value::Null)),
        ("sync/interval_ms", Some(Value::Null)),
        ("sync/max_stale_ms", Some(Value::Null)),
        ("sync/idle_ms", Some(Value::Null)),
        ("sync/max_unsent_calls", Some(Value::Null)),
        ("sync/unknown_ttl_ms", Some(Value::Null)),
        ("lease/min_calls", Some(Value::Null)),
        ("lease/max_calls", Some(Value::Null)),
        ("lease/low_water_percent", Some(Value::Null)),
        ("lease/horizon_ms", Some(Value::Null)),
        ("lease/idle_release_ms", Some(Value::Null)),
        ("lease/ttl_ms", Some(Value::Null)),
        ("failure_mode", Some(Value::Null)),
        ("offline_allowance", Some(Value::Null)),
        ("response_headers", Some(Value::Null)),
        // An object written as an array, member by member (serde reads a struct so).
        ("ledger", Some(json!(["ledger", null, null, "secret"]))),
        ("subject", Some(json!(["x-user"]))),
        ("sync", Some(json!(["cached"]))),
        ("lease", Some(json!([10, 100]))),
        ("pricing", Some(json!([[], true]))),
        ("response_headers", Some(json!(["x-balance"]))),
        ("subject/require_headers", Some(json!({"0": "x-credential-identifier"}))),
    ];
    cases.extend(valid.into_iter().map(|(p, v)| (with(p, Some(v)), true)));
    cases.extend(invalid.into_iter().map(|(p, v)| (with(p, v), false)));
    let ai = |units: Value| json!({"ledger": {"upstream": "l", "token": "t"}, "currency": "USD", "pricing": {"units": units}});
    let rule = |extra: Value| {
        let mut r = json!({"name": "output_tokens", "unit_price": "0.000008", "source": {"response_json": "/usage/completion_tokens"}});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    let pricing_valid = [
        ai(json!([rule(json!({}))])),
        ai(json!([rule(
            json!({"feature_key": "output_tokens", "estimate": {"request_json": "/max_tokens", "default_units": "1024"}})
        )])),
        ai(json!([rule(json!({"estimate": {"units": "500"}, "source": {"response_header": "x-tokens"}}))])),
        ai(json!([rule(json!({"source": {"request_header": "x-units"}, "unit_price": "1000000"}))])),
        ai(json!([
            rule(json!({"estimate": {"request_json": "/n"}})),
            rule(json!({"name": "in", "estimate": {"units": "1000000000000"}}))
        ])),
        with(
            "pricing",
            Some(
                json!({"charge_errors": true, "missing_usage": "charge_nothing", "max_body_bytes": 1024, "hold_timeout_ms": 1000}),
            ),
        ),
        with("pricing", Some(json!({"units": [rule(json!({}))]}))),
        with("pricing", Some(json!({}))),
        // The largest count, written with a decimal point: the filter takes it.
        ai(json!([rule(json!({"estimate": {"units": "1000000000000.0"}}))])),
        ai(json!([rule(json!({"estimate": {"units": "1000000000000.0000000000000000"}}))])),
        ai(json!([rule(json!({"name": "a".repeat(64)}))])),
        ai(json!([rule(json!({"name": "output tokens (o1)"}))])),
        ai(json!([rule(json!({"source": {"response_json": format!("/{}", "a".repeat(255))}}))])),
        ai(json!([rule(json!({"source": {"response_json": "/choices/0/usage/a~1b c"}}))])),
    ];
    let pricing_invalid = [
        ai(json!([])),
        ai(json!([rule(json!({"source": {}}))])),
        ai(json!([rule(json!({"source": {"response_json": "/a", "response_header": "x"}}))])),
        ai(json!([rule(json!({"source": {"response_json": "usage/x"}}))])),
        ai(json!([rule(json!({"source": {"response_header": "X-Tokens"}}))])),
        ai(json!([rule(json!({"source": {"body": "/x"}}))])),
        ai(json!([rule(json!({"unit_price": "-1"}))])),
        ai(json!([rule(json!({"unit_price": "1000000.5"}))])),
        ai(json!([rule(json!({"unit_price": 0.1}))])),
        ai(json!([rule(json!({"name": ""}))])),
        ai(json!([rule(json!({"feature_key": "Output"}))])),
        ai(json!([rule(json!({"estimate": {"units": "1", "request_json": "/n"}}))])),
        ai(json!([rule(json!({"estimate": {"units": "1", "default_units": "2"}}))])),
        ai(json!([rule(json!({"estimate": {"default_units": "2"}}))])),
        ai(json!([rule(json!({"estimate": {"units": "1000000000001"}}))])),
        ai(json!([rule(json!({"estimate": {"units": "-1"}}))])),
        ai(json!([rule(json!({"extra": 1}))])),
        ai(json!([{"name": "a", "source": {"response_header": "x"}}])),
        ai(json!((0..9).map(|i| rule(json!({"name": format!("r{i}")}))).collect::<Vec<_>>())),
        with("pricing/missing_usage", Some(json!("guess"))),
        with("pricing/max_body_bytes", Some(json!(1023))),
        with("pricing/hold_timeout_ms", Some(json!(999))),
        with("pricing/charge_errors", Some(json!("no"))),
        with("pricing/other", Some(json!(1))),
        // More decimals than a count can carry (rust_decimal: 28): the filter refuses it.
        ai(json!([rule(json!({"estimate": {"units": format!("0.{}1", "0".repeat(28))}}))])),
        // More places or digits than the schema's pattern allows, or a space: the filter read
        // counts leniently (as it reads them at run time).
        ai(json!([rule(json!({"estimate": {"units": format!("0.{}1", "0".repeat(16))}}))])),
        ai(json!([rule(json!({"estimate": {"units": "0000000000001"}}))])),
        ai(json!([rule(json!({"estimate": {"units": " 5"}}))])),
        ai(json!([rule(json!({"estimate": {"request_json": "/n", "default_units": "5 "}}))])),
        ai(json!([rule(json!({"unit_price": "0000001"}))])),
        // Lengths: Kong counts bytes in patterns, and in maxLength before 3.9; characters in
        // maxLength from 3.9. Only printable ASCII is counted alike: pointers and names keep to it.
        ai(json!([rule(json!({"source": {"response_json": format!("/{}", "é".repeat(128))}}))])),
        ai(json!([rule(json!({"source": {"response_json": "/usage/é"}}))])),
        ai(json!([rule(json!({"source": {"response_json": format!("/{}", "a".repeat(256))}}))])),
        ai(json!([rule(json!({"name": "é".repeat(33)}))])),
        ai(json!([rule(json!({"name": "a".repeat(65)}))])),
        // A control character: PCRE's `.` stops at a newline; a trailing one passes its `$`.
        ai(json!([rule(json!({"source": {"response_json": "/a\nb"}}))])),
        ai(json!([rule(json!({"source": {"response_json": "/usage/total\n"}}))])),
        ai(json!([rule(json!({"estimate": {"request_json": "/a\tb"}}))])),
        ai(json!([rule(json!({"name": "tokens\n"}))])),
        ai(json!([rule(json!({"name": "in\tout"}))])),
        // null where the schema has no null.
        with("price", Some(Value::Null)),
        {
            let mut c = ai(json!([rule(json!({}))]));
            c["price"] = Value::Null;
            c
        },
        ai(json!([rule(json!({"feature_key": null}))])),
        ai(json!([rule(json!({"estimate": null}))])),
        ai(json!([rule(json!({"source": {"response_json": null, "response_header": "x-tokens"}}))])),
        ai(json!([rule(json!({"estimate": {"units": "5", "request_json": null}}))])),
        ai(json!([rule(json!({"estimate": {"request_json": "/n", "default_units": null}}))])),
        // Objects written as arrays.
        ai(json!([["output_tokens", "0.000008", null, {"response_header": "x-tokens"}]])),
        ai(json!([rule(json!({"source": ["/usage/total"]}))])),
        ai(json!([rule(json!({"estimate": ["5"]}))])),
        json!([{"upstream": "ledger", "token": "secret"}, {}, "0.01", "USD"]),
    ];
    cases.extend(pricing_valid.into_iter().map(|c| (c, true)));
    cases.extend(pricing_invalid.into_iter().map(|c| (c, false)));
    cases.push((json!([]), false));
    cases.push((json!("a string"), false));
    cases
}

/// Every configuration of the corpus gets one verdict: from the schema (as the specification
/// reads it, and as Kong before 3.9 and from 3.9 do), and from the filter, given the
/// configuration as written (Envoy) or as Kong hands it over.
#[test]
fn schema_and_parser_agree_on_every_config_of_the_corpus() {
    let validators =
        [("schema", schema()), ("Kong 3.5-3.8", kong(Kong::Before3_9)), ("Kong 3.9+", kong(Kong::From3_9))];
    let mut disagreements = Vec::new();
    for (config, expected) in corpus() {
        let mut wrong: Vec<String> = validators
            .iter()
            .filter(|(_, v)| v.is_valid(&config) != expected)
            .map(|(name, _)| format!("{name} {}", !expected))
            .collect();
        for (sent, how) in [(config.clone(), "as written"), (as_kong_sends(&config, true), "as Kong sends it")] {
            let by_parser = FilterConfig::parse(sent.to_string().as_bytes());
            if by_parser.is_ok() != expected {
                wrong.push(format!("parser {how}: {by_parser:?}"));
            }
        }
        if !wrong.is_empty() {
            disagreements.push(format!("{config}: expected {expected}; {}", wrong.join("; ")));
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

/// Where Kong's validator departs from the specification (so the schema alone cannot agree):
/// an empty table is both an empty object and an empty array, a number without a fraction is an
/// integer. What Kong takes, the filter takes as Kong hands it over; what Kong refuses never
/// reaches it.
#[test]
fn the_filter_takes_what_kong_takes_as_kong_hands_it_over() {
    let ai_rule = |extra: Value| {
        let mut r = json!({"name": "t", "unit_price": "1", "source": {"response_header": "x-t"}});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        json!({"ledger": {"upstream": "l", "token": "t"}, "currency": "USD", "pricing": {"units": [r]}})
    };
    let without_price = |mut c: Value| {
        c.as_object_mut().unwrap().remove("price");
        c
    };
    let cases = [
        (with("subject", Some(json!([]))), true),
        (with("sync", Some(json!([]))), true),
        (with("lease", Some(json!([]))), true),
        (with("pricing", Some(json!([]))), true),
        (with("response_headers", Some(json!([]))), true),
        (with("subject/require_headers", Some(json!({}))), true),
        (with("pricing/units", Some(json!({}))), true),
        (with("ledger/timeout_ms", Some(json!(1000.0))), true),
        (with("sync/interval_ms", Some(json!(5e2))), true),
        // The one integer whose minimum is 0.
        (with("sync/unknown_ttl_ms", Some(json!(-0.0))), true),
        (with("sync/unknown_ttl_ms", Some(json!(-0.5))), false),
        (with("ledger", Some(json!([]))), false),
        // No price, and no rule but an empty table: Kong's minItems counts it as an array.
        (without_price(with("pricing/units", Some(json!({})))), false),
        (ai_rule(json!({"source": []})), false),
        (ai_rule(json!({"estimate": []})), false),
        (with("ledger/timeout_ms", Some(json!(1000.5))), false),
    ];
    let mut disagreements = Vec::new();
    for version in [Kong::Before3_9, Kong::From3_9] {
        let kong = kong(version);
        for (config, expected) in &cases {
            if kong.is_valid(config) != *expected {
                disagreements.push(format!("{config}: expected {expected}, {version:?} {}", !expected));
            }
            for empty_as_object in [false, true] {
                let sent = as_kong_sends(config, empty_as_object);
                let by_parser = FilterConfig::parse(sent.to_string().as_bytes());
                if by_parser.is_ok() != *expected {
                    disagreements
                        .push(format!("{sent} (Kong sends {config}): expected {expected}, parser {by_parser:?}"));
                }
            }
        }
    }
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}

#[test]
fn parser_errors_name_the_field_the_schema_points_at() {
    let config = with("ledger/timeout_ms", Some(json!(0)));
    let err = FilterConfig::parse(config.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.field, "ledger.timeout_ms");
    let schema_error = schema().iter_errors(&config).next().map(|e| e.instance_path.to_string());
    assert_eq!(schema_error.as_deref(), Some("/ledger/timeout_ms"));
}

#[test]
fn every_schema_property_has_a_description_or_a_default() {
    fn walk(path: &str, node: &Value, missing: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                if prop.get("description").is_none() && prop.get("default").is_none() {
                    missing.push(here.clone());
                }
                walk(&here, prop, missing);
            }
        }
    }
    let meta: Value = serde_json::from_str(include_str!("../plugin-schema/prepaid_credits.meta.json")).expect("json");
    let mut missing = Vec::new();
    walk("config", &meta["config_schema"], &mut missing);
    assert!(missing.is_empty(), "undocumented keys: {missing:?}");
}

/// Kong validates a filter's config with lua-resty-ljsonschema, whose `pattern` is
/// `ngx.re.find(value, pattern, "jo")`: PCRE, where `$` also matches before a final newline.
/// Emulated here (`P$` -> `P\n?$`): a trailing newline the filter refuses must not get through.
#[test]
fn a_trailing_newline_is_refused_by_the_schema_as_kong_runs_it() {
    fn pcre_dollar(node: &mut Value) {
        match node {
            Value::Object(map) => {
                if let Some(Value::String(p)) = map.get_mut("pattern") {
                    if let Some(body) = p.strip_suffix('$') {
                        *p = format!("{body}\\n?$");
                    }
                }
                map.values_mut().for_each(pcre_dollar);
            }
            Value::Array(items) => items.iter_mut().for_each(pcre_dollar),
            _ => {}
        }
    }
    let mut meta: Value = serde_json::from_str(include_str!("../plugin-schema/prepaid_credits.meta.json")).unwrap();
    pcre_dollar(&mut meta["config_schema"]);
    let kong = jsonschema::draft4::new(&meta["config_schema"]).unwrap();
    let cases = [
        ("ledger/token", json!("secret\n")),
        ("ledger/upstream", json!("127.0.0.1:8480\n")),
        ("subject/header", json!("x-consumer-username\n")),
        ("price", json!("0.01\n")),
        ("currency", json!("USD\n")),
        ("response_headers/balance", json!("x-credits-balance\n")),
    ];
    let mut accepted = Vec::new();
    for (path, value) in cases {
        let config = with(path, Some(value));
        let parsed = FilterConfig::parse(config.to_string().as_bytes());
        assert!(parsed.is_err(), "the filter refuses {config}");
        if kong.is_valid(&config) {
            accepted.push(format!("{config} -> filter: {}", parsed.unwrap_err()));
        }
    }
    assert!(accepted.is_empty(), "Kong accepts, the filter answers 500:\n{}", accepted.join("\n"));
}
