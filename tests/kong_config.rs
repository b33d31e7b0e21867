#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail by panicking
//! kong-config/: every filter configuration shipped there (declarative files and Admin API
//! examples) is valid for Kong (the meta.json `config_schema`) and for the filter (its own parser),
//! the declarative files hang together, and kong.conf loads the filter with its shared memory.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use prepaid_credits::config::FilterConfig;
use serde_json::{json, Value};

const KONG_YAML: &str = include_str!("../kong-config/kong.yaml");
const KONG_LEGACY_YAML: &str = include_str!("../kong-config/kong-3.5-3.8.yaml");
const ADMIN_API: &str = include_str!("../kong-config/admin-api.sh");
const KONG_CONF: &str = include_str!("../kong-config/kong.conf");
const META: &str = include_str!("../plugin-schema/prepaid_credits.meta.json");
const CARGO_TOML: &str = include_str!("../Cargo.toml");

const FILTER: &str = "prepaid_credits";
/// The headers key-auth sets on the upstream request (and overwrites if the client sent them).
const KEY_AUTH_HEADERS: [&str; 4] =
    ["x-consumer-username", "x-consumer-id", "x-consumer-custom-id", "x-credential-identifier"];
/// What the admin script's `${LEDGER_TOKEN}` stands for here.
const TEST_TOKEN: &str = "test-ledger-token";
/// The customer count kong.conf sizes its zone for.
const DOCUMENTED_CUSTOMERS: u64 = 20_000;

fn validator() -> jsonschema::Validator {
    let meta: Value = serde_json::from_str(META).expect("meta.json is JSON");
    jsonschema::draft4::new(&meta["config_schema"]).expect("config_schema is a valid draft-04 schema")
}

fn yaml(name: &str, text: &str) -> Value {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{name} is not YAML: {e}"))
}

/// Problems of one filter configuration: by the schema Kong validates with, by the filter's parser
/// (fed the JSON text Kong would pass), and against Kong's engine (ledger reached by ip:port).
fn config_problems(place: &str, config: &Value) -> Vec<String> {
    let mut problems: Vec<String> =
        validator().iter_errors(config).map(|e| format!("{place}: schema: {e} at {}", e.instance_path)).collect();
    if let Err(e) = FilterConfig::parse(config.to_string().as_bytes()) {
        problems.push(format!("{place}: parser: {e}"));
    }
    let upstream = config["ledger"]["upstream"].as_str().unwrap_or_default();
    match upstream.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => {}
        _ => problems.push(format!("{place}: ledger.upstream {upstream:?} is not an ip:port literal")),
    }
    problems
}

fn names<'a>(items: &'a [Value], key: &str, what: &str) -> BTreeSet<&'a str> {
    let mut seen = BTreeSet::new();
    for item in items {
        let name = item[key].as_str().filter(|n| !n.is_empty());
        let name = name.unwrap_or_else(|| panic!("{what} without a {key}: {item}"));
        assert!(seen.insert(name), "{what} {key} {name:?} is not unique");
    }
    seen
}

fn list<'a>(doc: &'a Value, key: &str) -> &'a [Value] {
    match doc.get(key) {
        None => &[],
        Some(v) => v.as_array().map(Vec::as_slice).unwrap_or_else(|| panic!("{key} is not a list")),
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Form {
    /// Kong 3.9+: `plugins: - name: prepaid_credits, route: …, config: …`.
    Plugins,
    /// Kong 3.5–3.8: `filter_chains: - route: …, filters: [{name: prepaid_credits, config: …}]`.
    FilterChains,
}

/// Checks a declarative file and returns its filter configs by route name.
fn declarative(name: &str, text: &str, form: Form) -> BTreeMap<String, Value> {
    let doc = yaml(name, text);
    assert_eq!(doc["_format_version"], json!("3.0"), "{name}: _format_version");
    let known = ["_format_version", "services", "routes", "consumers", "plugins", "filter_chains"];
    for key in doc.as_object().expect("a mapping").keys() {
        assert!(known.contains(&key.as_str()), "{name}: unexpected top-level key {key}");
    }

    // Every reference is explicit (top-level entities naming their parent), so it is checked here.
    let services = list(&doc, "services");
    let routes = list(&doc, "routes");
    for entity in services.iter().chain(routes) {
        for nested in ["routes", "plugins", "filter_chains"] {
            assert!(entity.get(nested).is_none(), "{name}: nested {nested} in {entity}; use the top-level list");
        }
    }
    let service_names = names(services, "name", "service");
    for s in services {
        assert!(s["url"].as_str().is_some_and(|u| u.starts_with("http")), "{name}: service without url: {s}");
    }
    let route_names = names(routes, "name", "route");
    let mut service_of = BTreeMap::new();
    for r in routes {
        let service = r["service"].as_str().unwrap_or_else(|| panic!("{name}: route without service: {r}"));
        assert!(service_names.contains(service), "{name}: route {} names unknown service {service}", r["name"]);
        assert!(list(r, "paths").iter().all(|p| p.as_str().is_some_and(|p| p.starts_with('/'))), "{name}: {r}");
        assert!(!list(r, "paths").is_empty(), "{name}: route {} without paths", r["name"]);
        service_of.insert(r["name"].as_str().unwrap_or_default(), service);
    }
    assert_eq!(route_names.len(), 2, "{name}: two routes");

    let consumers = list(&doc, "consumers");
    let usernames = names(consumers, "username", "consumer");
    assert_eq!(usernames.len(), 2, "{name}: two consumers");
    let mut keys = BTreeSet::new();
    for c in consumers {
        let creds = list(c, "keyauth_credentials");
        assert!(!creds.is_empty(), "{name}: consumer {} has no key-auth credential", c["username"]);
        for k in creds {
            let key = k["key"].as_str().filter(|k| !k.is_empty()).expect("a key");
            assert!(keys.insert(key), "{name}: API key {key} used twice");
        }
    }

    // Plugins: key-auth and (3.9+ form) the filter, each scoped to exactly one route or service.
    let mut scopes = BTreeSet::new();
    let mut key_auth = BTreeSet::new();
    let mut configs = BTreeMap::new();
    for p in list(&doc, "plugins") {
        let plugin = p["name"].as_str().unwrap_or_default();
        assert!(p.get("consumer").is_none(), "{name}: consumer-scoped plugin {p}");
        let scope = match (p["route"].as_str(), p["service"].as_str()) {
            (Some(r), None) => {
                assert!(route_names.contains(r), "{name}: plugin {plugin} names unknown route {r}");
                ("route", r)
            }
            (None, Some(s)) => {
                assert!(service_names.contains(s), "{name}: plugin {plugin} names unknown service {s}");
                ("service", s)
            }
            _ => panic!("{name}: plugin {plugin} must name exactly one route or service: {p}"),
        };
        assert!(scopes.insert((plugin, scope)), "{name}: two {plugin} plugins on {scope:?}");
        let enabled = p.get("enabled") != Some(&json!(false));
        match plugin {
            "key-auth" => {
                assert!(p["config"].get("anonymous").is_none(), "{name}: key-auth with anonymous on {scope:?}");
                if enabled {
                    key_auth.insert(scope);
                }
            }
            FILTER => {
                assert_eq!(form, Form::Plugins, "{name}: the filter as a plugin needs Kong 3.9+");
                assert_eq!(scope.0, "route", "{name}: the examples meter routes");
                assert!(enabled, "{name}: a disabled filter on {scope:?}");
                configs.insert(scope.1.to_owned(), p["config"].clone());
            }
            other => panic!("{name}: unexpected plugin {other} (a misspelt filter name?)"),
        }
    }

    let chains = list(&doc, "filter_chains");
    if form == Form::Plugins {
        assert!(chains.is_empty(), "{name}: uses the plugin form only");
    }
    let _ = names(chains, "name", "filter chain");
    let mut chained_routes = BTreeSet::new();
    for chain in chains {
        let route = chain["route"].as_str().unwrap_or_else(|| panic!("{name}: chain without route: {chain}"));
        assert!(chain.get("service").is_none(), "{name}: a chain has one owner: {chain}");
        assert!(route_names.contains(route), "{name}: chain names unknown route {route}");
        assert!(chained_routes.insert(route), "{name}: two filter chains on route {route}");
        assert_ne!(chain.get("enabled"), Some(&json!(false)), "{name}: disabled chain");
        let filters = list(chain, "filters");
        assert!(!filters.is_empty(), "{name}: chain on {route} without filters");
        for f in filters {
            assert_eq!(f["name"], json!(FILTER), "{name}: filter on {route}");
            assert!(configs.insert(route.to_owned(), f["config"].clone()).is_none(), "{name}: {route} twice");
        }
    }

    assert_eq!(configs.len(), 2, "{name}: filter configs found: {:?}", configs.keys());
    let mut problems = Vec::new();
    let (mut prices, mut features) = (BTreeSet::new(), BTreeSet::new());
    for (route, config) in &configs {
        problems.extend(config_problems(&format!("{name} route {route}"), config));
        // Only an authentication plugin makes the consumer header trustworthy.
        let service = service_of[route.as_str()];
        let guarded = key_auth.contains(&("route", route.as_str())) || key_auth.contains(&("service", service));
        assert!(guarded, "{name}: route {route} carries the filter without key-auth");
        let header = config["subject"]["header"].as_str().unwrap_or("x-consumer-username");
        assert!(KEY_AUTH_HEADERS.contains(&header), "{name}: {route} reads the subject from {header}");
        prices.insert(config["price"].to_string());
        features.insert(config["feature_key"].to_string());
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!((prices.len(), features.len()), (2, 2), "{name}: the two routes differ in price and feature");
    configs
}

#[test]
fn kong_yaml_is_a_consistent_declarative_config_with_valid_filter_plugins() {
    let configs = declarative("kong.yaml", KONG_YAML, Form::Plugins);
    assert_eq!(configs.keys().collect::<Vec<_>>(), ["chat", "embeddings"]);
}

#[test]
fn the_3_5_to_3_8_file_is_the_same_setup_with_filter_chains() {
    let chains = declarative("kong-3.5-3.8.yaml", KONG_LEGACY_YAML, Form::FilterChains);
    let plugins = declarative("kong.yaml", KONG_YAML, Form::Plugins);
    assert_eq!(chains, plugins, "the filter configs differ between the two declarative files");
    let strip = |text: &str, name: &str| {
        let mut doc = yaml(name, text);
        let doc = doc.as_object_mut().expect("mapping");
        doc.remove("filter_chains");
        let plugins = doc.get_mut("plugins").and_then(Value::as_array_mut).expect("plugins");
        plugins.retain(|p| p["name"] != json!(FILTER));
        Value::Object(doc.clone())
    };
    assert_eq!(strip(KONG_LEGACY_YAML, "kong-3.5-3.8.yaml"), strip(KONG_YAML, "kong.yaml"), "apart from the filter");
}

/// One Admin API call of admin-api.sh that sends a JSON body.
#[derive(Debug)]
struct Call {
    line: usize,
    method: String,
    path: String,
    body: Value,
}

fn admin_calls() -> Vec<Call> {
    let lines: Vec<&str> = ADMIN_API.lines().collect();
    let mut calls = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        if line.trim_start().starts_with('#') {
            continue;
        }
        if !line.contains("<<JSON") {
            assert!(!line.contains("--data @-"), "admin-api.sh:{i}: a stdin body that is not a <<JSON heredoc");
            continue;
        }
        assert!(line.contains("--data @-"), "admin-api.sh:{i}: a heredoc that is not a request body");
        let words: Vec<&str> = line.split_whitespace().collect();
        let method = words.iter().position(|w| *w == "-X").map(|p| words[p + 1]).expect("-X METHOD");
        let url = words.iter().find(|w| w.contains("$ADMIN/")).expect("an $ADMIN URL");
        let path = url.trim_matches('"').trim_start_matches("$ADMIN").to_owned();
        let start = i;
        let mut body = String::new();
        while lines.get(i).is_some_and(|l| *l != "JSON") {
            body.push_str(lines[i]);
            body.push('\n');
            i += 1;
        }
        assert!(i < lines.len(), "admin-api.sh:{start}: heredoc not closed");
        i += 1;
        let body = body.replace("${LEDGER_TOKEN}", TEST_TOKEN);
        assert!(!body.contains('$') && !body.contains('`'), "admin-api.sh:{start}: unexpected expansion in {body}");
        let body = serde_json::from_str(&body).unwrap_or_else(|e| panic!("admin-api.sh:{start}: not JSON: {e}"));
        calls.push(Call { line: start, method: method.to_owned(), path, body });
    }
    calls
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object().expect("a JSON object").keys().map(String::as_str).collect()
}

/// The filter configs a body carries: the plugin form's `config`, or a chain's filters' configs.
fn body_configs(call: &Call) -> Vec<Value> {
    let place = format!("admin-api.sh:{} {} {}", call.line, call.method, call.path);
    let is_chain = call.path.contains("filter-chains");
    let allowed: &[&str] = if is_chain {
        &["name", "filters", "enabled", "route", "service", "tags"]
    } else {
        &["name", "config", "enabled", "route", "service", "protocols", "instance_name", "tags"]
    };
    assert!(keys(&call.body).iter().all(|k| allowed.contains(k)), "{place}: {}", call.body);
    if let Some(name) = call.body.get("name").filter(|_| !is_chain) {
        assert_eq!(name, &json!(FILTER), "{place}");
    }
    match (call.body.get("config"), call.body.get("filters")) {
        (Some(config), None) => vec![config.clone()],
        (None, Some(filters)) => {
            let filters = filters.as_array().expect("filters is a list");
            assert!(!filters.is_empty(), "{place}: empty filters");
            filters
                .iter()
                .map(|f| {
                    assert!(keys(f).iter().all(|k| ["name", "config", "enabled"].contains(k)), "{place}: {f}");
                    assert_eq!(f["name"], json!(FILTER), "{place}");
                    f["config"].clone()
                })
                .collect()
        }
        (None, None) => {
            assert_eq!(call.body, json!({"enabled": false}), "{place}: a body without a filter config");
            Vec::new()
        }
        (Some(_), Some(_)) => panic!("{place}: both config and filters"),
    }
}

#[test]
fn every_admin_api_filter_config_is_valid_and_matches_kong_yaml() {
    let calls = admin_calls();
    let summary: Vec<String> = calls.iter().map(|c| format!("{} {}", c.method, c.path)).collect();
    assert_eq!(
        summary,
        [
            "POST /routes/chat/plugins",
            "POST /routes/embeddings/plugins",
            "PATCH /plugins/$CHAT",
            "PATCH /plugins/$EMB",
            "POST /routes/chat/filter-chains",
            "POST /routes/embeddings/filter-chains",
            "PATCH /filter-chains/$CHAT",
            "PATCH /filter-chains/$EMB",
        ]
    );
    let declared = declarative("kong.yaml", KONG_YAML, Form::Plugins);
    let without_token = |c: &Value| {
        let mut c = c.clone();
        c["ledger"].as_object_mut().expect("ledger").remove("token");
        c
    };
    let mut problems = Vec::new();
    let mut found = 0;
    let mut created = BTreeMap::new();
    for call in &calls {
        for config in body_configs(call) {
            found += 1;
            let place = format!("admin-api.sh:{} {} {}", call.line, call.method, call.path);
            problems.extend(config_problems(&place, &config));
            if config["ledger"]["token"] != json!(TEST_TOKEN) {
                problems.push(format!("{place}: the token does not come from $LEDGER_TOKEN"));
            }
            if call.method == "POST" {
                // POST /routes/{route}/…: the route exists and gets kong.yaml's config for it.
                let route = call.path.split('/').nth(2).expect("a route");
                let expected = declared.get(route).unwrap_or_else(|| panic!("route {route} is not in kong.yaml"));
                if without_token(&config) != without_token(expected) {
                    problems.push(format!("{place}: differs from kong.yaml's config for {route}"));
                }
                created.insert((call.path.contains("filter-chains"), route.to_owned()), config);
            } else {
                // The price change: the chat config again, only the price differs.
                let before = &created[&(call.path.contains("filter-chains"), "chat".to_owned())];
                let (mut a, mut b) = (config.clone(), before.clone());
                a["price"] = json!(null);
                b["price"] = json!(null);
                if config["price"] == before["price"] || a != b {
                    problems.push(format!("{place}: should change the price of the chat config, and only that"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(found, 6, "filter configs in admin-api.sh");
    // Disabling and removing, in both forms.
    for line in ["-X DELETE \"$ADMIN/plugins/$CHAT\"", "-X DELETE \"$ADMIN/filter-chains/$CHAT\""] {
        assert!(ADMIN_API.contains(line), "admin-api.sh lacks {line}");
    }
}

/// kong.conf's active `key = value` lines.
fn kong_conf() -> BTreeMap<&'static str, &'static str> {
    let mut conf = BTreeMap::new();
    for (n, line) in KONG_CONF.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("kong.conf:{}: not key = value", n + 1));
        // Kong reads `#` as the start of a comment: keep active lines free of it.
        assert!(!value.contains('#'), "kong.conf:{}: inline comment", n + 1);
        assert!(conf.insert(key.trim(), value.trim()).is_none(), "kong.conf: {} twice", key.trim());
    }
    conf
}

/// What ngx_wasm_module's shm_kv adds to each key and value (its rbtree node, queue links, CAS and
/// the two strings' headers), rounded up.
const ZONE_NODE_BYTES: usize = 100;

/// The slab allocation of a customer entry whose subject has `subject` bytes and feature key
/// `feature`: node, key and value in one allocation, rounded up to a power of two.
fn zone_allocation(subject: usize, feature: usize) -> u64 {
    use prepaid_credits::shared::Keyed;
    let key = format!("prepaid_credits/c/USD/{}/{}", "f".repeat(feature), "s".repeat(subject));
    let entry = prepaid_credits::customer::CustomerEntry::new(&key, &"s".repeat(subject), u64::MAX, 0);
    (ZONE_NODE_BYTES + key.len() + entry.encode().len()).next_power_of_two() as u64
}

fn size_bytes(size: &str) -> u64 {
    let size = size.split_whitespace().next().expect("a size");
    let (digits, unit) = size.split_at(size.find(|c: char| !c.is_ascii_digit()).unwrap_or(size.len()));
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("size {size:?}"));
    n * match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => panic!("size unit {unit:?}"),
    }
}

#[test]
fn kong_conf_loads_the_filter_with_its_shared_memory_zone() {
    let conf = kong_conf();
    assert_eq!(conf.get("wasm"), Some(&"on"));
    let path = conf.get("wasm_filters_path").expect("wasm_filters_path");
    assert!(path.starts_with('/'), "wasm_filters_path {path} is not absolute");
    let filters: Vec<&str> = conf.get("wasm_filters").expect("wasm_filters").split(',').map(str::trim).collect();
    assert!(filters.contains(&FILTER), "wasm_filters {filters:?}");
    // Kong names a filter after its file: the cdylib must come out as prepaid_credits.wasm.
    assert!(CARGO_TOML.contains("[lib]\nname = \"prepaid_credits\""), "the library is not named {FILTER}");
    assert!(KONG_CONF.contains("prepaid_credits.wasm") && KONG_CONF.contains("prepaid_credits.meta.json"));

    // The filter's shared-data keys start with `prepaid_credits/`: that is the zone's name.
    let zone = size_bytes(conf.get("nginx_wasm_shm_kv_prepaid_credits").expect("the prepaid_credits zone"));
    assert!(zone >= 15 << 10, "ngx_wasm_module needs at least 15k");
    for key in conf.keys() {
        assert!(!key.starts_with("nginx_wasm_shm_") || key.starts_with("nginx_wasm_shm_kv"), "pre-3.6 prefix: {key}");
    }
    // The size follows the documented formula for kong.yaml's (currency, feature) pairs.
    let pairs: BTreeSet<(String, String)> = declarative("kong.yaml", KONG_YAML, Form::Plugins)
        .values()
        .map(|c| (c["currency"].to_string(), c["feature_key"].to_string()))
        .collect();
    assert!(KONG_CONF.contains("size ~ 1.25 x P x (N x E + 64 KiB) + 1 MiB") && KONG_CONF.contains("N = 20,000"));
    assert!(KONG_CONF.contains("E = 1 KiB for subjects and feature keys up to 64 bytes, 2 KiB for subjects up to 256"));
    let e = zone_allocation(64, 64);
    assert_eq!((e, zone_allocation(256, 64)), (1024, 2048), "E as kong.conf states it");
    // The register: 16 shards, each one slab page with its node and key.
    let shard = prepaid_credits::registry::SHARD_BYTES + ZONE_NODE_BYTES + 64;
    assert!(shard <= 4096 && prepaid_credits::registry::SHARDS == 16, "64 KiB of register");
    let needed = pairs.len() as u64 * (DOCUMENTED_CUSTOMERS * e + (64 << 10)) * 5 / 4 + (1 << 20);
    assert!(zone >= needed, "zone {zone} B < formula {needed} B");

    // Fallback socket timeouts at both levels; isolation stays `none`.
    for key in ["socket_connect_timeout", "socket_send_timeout", "socket_read_timeout"] {
        assert!(conf.contains_key(format!("nginx_wasm_{key}").as_str()), "nginx_wasm_{key}");
        assert!(conf.contains_key(format!("nginx_http_wasm_{key}").as_str()), "nginx_http_wasm_{key}");
    }
    assert!(!conf.contains_key("nginx_http_proxy_wasm_isolation"));
}

#[test]
fn the_checks_catch_bad_configs() {
    // The checks above must be able to fail: a few configs they must refuse.
    let good = json!({"ledger": {"upstream": "127.0.0.1:8480", "token": "t"}, "price": "0.02", "currency": "USD"});
    assert!(config_problems("good", &good).is_empty());
    let mut cluster = good.clone();
    cluster["ledger"]["upstream"] = json!("ledger");
    let mut host = good.clone();
    host["ledger"]["upstream"] = json!("ledger.internal:8480");
    let mut float_price = good.clone();
    float_price["price"] = json!(0.02);
    let mut typo = good.clone();
    typo["feature"] = json!("chat");
    for bad in [cluster, host, float_price, typo] {
        assert!(!config_problems("bad", &bad).is_empty(), "{bad} passed");
    }
    assert_eq!(size_bytes("64m"), 64 << 20);
    assert_eq!(size_bytes("15k"), 15 << 10);
}
