#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking
//! The Kong metadata schema and the filter's own parser must agree on every configuration.

use prepaid_credits::config::FilterConfig;
use serde_json::{json, Value};

fn schema() -> jsonschema::Validator {
    let meta: Value =
        serde_json::from_str(include_str!("../plugin-schema/prepaid_credits.meta.json")).expect("meta.json is JSON");
    jsonschema::draft4::new(&meta["config_schema"]).expect("config_schema is a valid draft-04 schema")
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
    ];
    let invalid: [(&str, Option<Value>); 67] = [
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
        // Lengths are characters in JSON Schema (and in Kong's ljsonschema for maxLength).
        ai(json!([rule(json!({"name": "é".repeat(33)}))])),
        // The largest count, written with a decimal point: the filter takes it.
        ai(json!([rule(json!({"estimate": {"units": "1000000000000.0"}}))])),
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
    ];
    cases.extend(pricing_valid.into_iter().map(|c| (c, true)));
    cases.extend(pricing_invalid.into_iter().map(|c| (c, false)));
    cases.push((json!([]), false));
    cases.push((json!("a string"), false));
    cases
}

#[test]
fn schema_and_parser_agree_on_every_config_of_the_corpus() {
    let validator = schema();
    let mut disagreements = Vec::new();
    for (config, expected) in corpus() {
        let by_schema = validator.is_valid(&config);
        let by_parser = FilterConfig::parse(config.to_string().as_bytes());
        if by_schema != expected || by_parser.is_ok() != expected {
            disagreements.push(format!("{config}: expected {expected}, schema {by_schema}, parser {by_parser:?}"));
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
