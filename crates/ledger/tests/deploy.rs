//! The Grafana dashboard and the Prometheus alert rules under `deploy/`: both parse, and every
//! expression names only metrics that exist — the ledger's (read from its source), the filter's
//! (the README's Metrics section, as Envoy exports them). `promtool check rules` runs in
//! `scripts/test` as well.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn rust_sources(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).expect("source dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(std::fs::read_to_string(&path).expect("source"));
        }
    }
}

/// Quoted words after `marker` in `text`, e.g. the names in `add("name"`.
fn quoted_after(text: &str, marker: &str) -> Vec<String> {
    text.split(marker).skip(1).filter_map(|rest| rest.split('"').next()).map(str::to_owned).collect()
}

fn known_metrics() -> BTreeSet<String> {
    let mut known: BTreeSet<String> = ["up".to_owned()].into();
    let metrics_rs = read("crates/ledger/src/metrics.rs");
    for word in metrics_rs.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("credits_ledger_") && word.len() > "credits_ledger_".len() {
            known.insert(word.to_owned());
        }
    }
    let mut sources = Vec::new();
    rust_sources(&repo().join("crates/ledger/src"), &mut sources);
    for name in sources.iter().flat_map(|s| quoted_after(s, "add(\"")) {
        known.insert(format!("credits_ledger_{name}_total"));
    }
    let readme = read("README.md");
    let section = readme.split("### Metrics").nth(1).expect("README has a Metrics section");
    let section = section.split("\n## ").next().unwrap_or(section);
    for name in section.split('`').skip(1).step_by(2).filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
    {
        known.insert(format!("envoy_wasmcustom_{name}"));
        for suffix in ["_bucket", "_sum", "_count"] {
            known.insert(format!("envoy_wasmcustom_{name}{suffix}"));
        }
    }
    known
}

/// Operators, modifiers and aggregations (an aggregation may be followed by `by (…)` rather than
/// its parenthesis).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "and",
    "or",
    "unless",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
];

/// The metric names a PromQL expression reads: identifiers outside label matchers, ranges,
/// strings and groupings that are neither functions nor keywords.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let (mut names, mut i, mut depth_braces, mut grouping) = (Vec::new(), 0, 0, false);
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
            }
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            '[' => {
                while i < chars.len() && chars[i] != ']' {
                    i += 1;
                }
            }
            ')' => grouping = false,
            c if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                while i + 1 < chars.len()
                    && (chars[i + 1].is_ascii_alphanumeric()
                        || matches!(chars[i + 1], '.' | '-' | '+') && matches!(chars[i], 'e' | 'E'))
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i + 1 < chars.len() && (chars[i + 1].is_ascii_alphanumeric() || matches!(chars[i + 1], '_' | ':'))
                {
                    i += 1;
                }
                let word: String = chars[start..=i].iter().collect();
                let next = chars[i + 1..].iter().find(|c| !c.is_whitespace());
                if matches!(word.as_str(), "by" | "without" | "on" | "ignoring") {
                    grouping = true;
                } else if depth_braces == 0 && !grouping && next != Some(&'(') && !KEYWORDS.contains(&word.as_str()) {
                    names.push(word);
                }
            }
            _ => {}
        }
        i += 1;
    }
    names
}

fn assert_known(what: &str, expr: &str, known: &BTreeSet<String>) {
    let names = metric_names(expr);
    assert!(!names.is_empty(), "{what}: no metric in {expr:?}");
    for name in names {
        assert!(known.contains(&name), "{what}: {name} is no metric the ledger or the filter exports ({expr:?})");
    }
}

#[test]
fn the_expression_reader_finds_metrics_only() {
    let expr = r#"sum by (route, le) (rate(credits_ledger_requests_total{job="x",status=~"5.."}[5m])) / clamp_min(up, 1e-9) > 0.01"#;
    assert_eq!(metric_names(expr), ["credits_ledger_requests_total", "up"]);
}

#[test]
fn every_dashboard_panel_reads_metrics_that_exist() {
    let dashboard: Value =
        serde_json::from_str(&read("deploy/grafana/credits-dashboard.json")).expect("dashboard JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let known = known_metrics();
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        if panel["type"] == "row" {
            continue;
        }
        panels += 1;
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("panel without targets: {panel}"));
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            assert_known(panel["title"].as_str().unwrap_or("?"), t["expr"].as_str().expect("expr"), &known);
        }
    }
    assert!(panels >= 10, "{panels} panels");
}

#[test]
fn every_alert_rule_reads_metrics_that_exist_and_says_what_to_do() {
    let rules: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/prometheus/credits-alerts.yml")).expect("rules YAML");
    let known = known_metrics();
    let mut alerts = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().expect("alert name");
            assert_known(name, rule["expr"].as_str().expect("expr"), &known);
            assert!(
                rule["labels"]["severity"].as_str().is_some_and(|s| ["warning", "critical"].contains(&s)),
                "{name}"
            );
            assert!(rule["annotations"]["summary"].is_string(), "{name}");
            alerts.push(name.to_owned());
        }
    }
    for wanted in ["LedgerDown", "SyncFailures", "LeasesExpiringUnreported", "WebhookDeliveries", "SharedDataPressure"]
    {
        assert!(alerts.iter().any(|a| a.contains(wanted)), "no alert on {wanted}: {alerts:?}");
    }
}
