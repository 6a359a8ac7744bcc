//! The operations files of `deploy/` (README "Operations files"), checked against the relay
//! itself rather than against a list kept beside them:
//!
//! - every series the alert rules and the Grafana dashboard name, with the labels and label
//!   values they match on, is one a running relay (the binary, started as an operator would)
//!   shows on `/metrics` after some traffic: a message sent, one refused, one throttled, one
//!   retried until dead, webhooks, reloads, a crowded metrics port;
//! - the Kubernetes examples: one SQLite replica on a volume, three PostgreSQL replicas; probes
//!   on the relay's own port and paths; a non-root, read-only container; and every variable they
//!   set accepted by `bonychat-relay check-config` in the image's environment, secrets read
//!   through `<NAME>_FILE` from the mounted Secret.
//!
//! `promtool check rules` and `promtool test rules` (scripts/check-alert-rules, in .ci/run) check
//! the rules' syntax and when they fire, and the dashboard's queries' syntax.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bonychat_relay::monitoring::SCRAPE_CACHE_PERIOD;
use serde_json::{Value, json};
use tokio::time::Instant;
use yaml_rust2::{Yaml, YamlLoader};

use crate::binary::{RelayProcess, json_logs, run_binary};
use crate::helpers::{
    API_TOKEN, APP_SECRET, CHANNEL_ID, JOINCHAT_SECRET, PAGE_ID, PSID, Reply, SilentFlood, StandIn, http_client,
    hub_signature, test_vars,
};
use crate::metrics::{Scrape, parse};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const DASHBOARD: &str = "deploy/grafana/bonychat-relay.json";
const KUBERNETES_SQLITE: &str = "deploy/kubernetes/sqlite";
const KUBERNETES_POSTGRES: &str = "deploy/kubernetes/postgres";

/// The scrape job name the files assume (`up{job="bonychat-relay"}`).
const JOB: &str = "bonychat-relay";
/// Labels Prometheus adds to every series it scrapes.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];
/// Series Prometheus records itself about each scrape.
const PROMETHEUS_SERIES: [&str; 2] = ["up", "scrape_duration_seconds"];

/// Label values that only rare events produce, which the traffic of these tests does not: each
/// with the source file that declares it, which [`rare_label_values_are_the_relays_own`] reads.
/// `busy` needs every slot of a listener answering a request while peers of several addresses
/// hold their fair share.
const RARE_LABEL_VALUES: &[(&str, &str, &str, &str)] =
    &[("bonychat_relay_connections_evicted_total", "reason", "busy", "src/server.rs")];

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// --- YAML, read into JSON values ------------------------------------------------------------

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let documents = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    documents.iter().filter(|d| !matches!(d, Yaml::Null)).map(|d| to_json(d, path)).collect()
}

fn to_json(yaml: &Yaml, path: &Path) -> Value {
    match yaml {
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Integer(n) => json!(n),
        Yaml::Real(r) => json!(r.parse::<f64>().unwrap_or_else(|_| panic!("{}: number {r}", path.display()))),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Null => Value::Null,
        Yaml::Array(items) => Value::Array(items.iter().map(|i| to_json(i, path)).collect()),
        Yaml::Hash(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(n) => n.to_string(),
                        other => panic!("{}: a key {other:?}", path.display()),
                    };
                    (key, to_json(v, path))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::BadValue => panic!("{}: unsupported YAML {yaml:?}", path.display()),
    }
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value.as_str().unwrap_or_else(|| panic!("{what} is not a string: {value}"))
}

// --- A reader of PromQL: the series, label matchers and grouping labels of an expression -------

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Op(String),
    /// A number, a duration, a range or subquery `[…]`, a Grafana variable.
    Other,
}

#[derive(Debug, Clone, PartialEq)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

#[derive(Debug, Clone, PartialEq)]
struct Selector {
    name: String,
    matchers: Vec<Matcher>,
}

#[derive(Debug, Default)]
struct PromQl {
    selectors: Vec<Selector>,
    /// Labels of `by`, `without`, `on`, `ignoring`, `group_left`, `group_right`.
    grouping: BTreeSet<String>,
}

/// PromQL's functions, separated by white space.
const FUNCTIONS: &str = "\
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp \
    clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month \
    deg delta deriv end exp floor histogram_count histogram_fraction histogram_quantile \
    histogram_sum holt_winters hour idelta increase irate label_join label_replace last_over_time ln \
    log10 log2 max_over_time min_over_time minute month pi predict_linear present_over_time \
    quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_desc sqrt start \
    stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year";
const AGGREGATIONS: &[&str] =
    &["sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"];
const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
const KEYWORDS: &[&str] = &["and", "or", "unless", "offset", "bool", "atan2", "inf", "nan"];

fn tokens(expr: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while chars.get(i).is_some_and(|&c| c != '\n') {
                i += 1;
            }
        } else if matches!(c, '"' | '\'' | '`') {
            let mut value = String::new();
            i += 1;
            loop {
                let ch = *chars.get(i).ok_or("an unterminated string")?;
                i += 1;
                if ch == c {
                    break;
                }
                if ch == '\\' && c != '`' {
                    let escaped = *chars.get(i).ok_or("a dangling escape")?;
                    i += 1;
                    value.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                } else {
                    value.push(ch);
                }
            }
            out.push(Token::Str(value));
        } else if c == '[' {
            // A range or a subquery: durations and Grafana variables only.
            let close = chars[i..].iter().position(|&c| c == ']').ok_or("an unclosed [")?;
            i += close + 1;
            out.push(Token::Other);
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while chars.get(i).is_some_and(|&c| word(c)) {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            // 0.99, 1e3, 5m, 1h30m.
            while chars.get(i).is_some_and(|&c| c.is_ascii_alphanumeric() || c == '.') {
                i += 1;
            }
            out.push(Token::Other);
        } else if c == '$' {
            // A Grafana variable: $name or ${name}.
            i += 1;
            if chars.get(i) == Some(&'{') {
                let close = chars[i..].iter().position(|&c| c == '}').ok_or("an unclosed ${")?;
                i += close + 1;
            } else {
                while chars.get(i).is_some_and(|&c| word(c)) {
                    i += 1;
                }
            }
            out.push(Token::Other);
        } else {
            let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
            if ["=~", "!~", "!=", "==", ">=", "<="].contains(&two.as_str()) {
                out.push(Token::Op(two));
                i += 2;
            } else if "{}(),=<>+-*/%^@".contains(c) {
                out.push(Token::Op(c.to_string()));
                i += 1;
            } else {
                return Err(format!("an unexpected {c:?}"));
            }
        }
    }
    Ok(out)
}

fn read_promql(expr: &str) -> Result<PromQl, String> {
    let tokens = tokens(expr)?;
    let is_op = |i: usize, op: &str| matches!(tokens.get(i), Some(Token::Op(o)) if o == op);
    let mut query = PromQl::default();
    let mut i = 0;
    while let Some(token) = tokens.get(i) {
        match token {
            Token::Ident(name) => {
                let lower = name.to_ascii_lowercase();
                if GROUPING.contains(&lower.as_str()) {
                    i += 1;
                    if is_op(i, "(") {
                        i += 1;
                        loop {
                            match tokens.get(i) {
                                Some(Token::Ident(label)) => {
                                    query.grouping.insert(label.clone());
                                }
                                Some(Token::Op(o)) if o == "," => {}
                                Some(Token::Op(o)) if o == ")" => break,
                                other => return Err(format!("`{name} (…)` holds {other:?}")),
                            }
                            i += 1;
                        }
                        i += 1;
                    }
                } else if KEYWORDS.contains(&lower.as_str()) || AGGREGATIONS.contains(&lower.as_str()) {
                    i += 1;
                } else if is_op(i + 1, "(") {
                    if !FUNCTIONS.split_whitespace().any(|f| f == name) {
                        return Err(format!("`{name}` is not a PromQL function"));
                    }
                    i += 1;
                } else {
                    let mut selector = Selector { name: name.clone(), matchers: Vec::new() };
                    i += 1;
                    if is_op(i, "{") {
                        i = read_matchers(&tokens, i + 1, &mut selector.matchers)?;
                    }
                    query.selectors.push(selector);
                }
            }
            Token::Op(o) if o == "{" => return Err("a selector without a metric name".into()),
            _ => i += 1,
        }
    }
    Ok(query)
}

/// Reads `label op "value"` pairs from `i` (just past the `{`) to the `}`; returns the index
/// after it.
fn read_matchers(tokens: &[Token], mut i: usize, out: &mut Vec<Matcher>) -> Result<usize, String> {
    loop {
        match tokens.get(i) {
            Some(Token::Op(o)) if o == "}" => return Ok(i + 1),
            Some(Token::Op(o)) if o == "," => i += 1,
            Some(Token::Ident(label)) => {
                let (Some(Token::Op(op)), Some(Token::Str(value))) = (tokens.get(i + 1), tokens.get(i + 2)) else {
                    return Err(format!("label {label} without an operator and a string"));
                };
                if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
                    return Err(format!("label {label} with the operator {op}"));
                }
                out.push(Matcher { label: label.clone(), op: op.clone(), value: value.clone() });
                i += 3;
            }
            other => return Err(format!("{other:?} in a selector")),
        }
    }
}

/// `{{ name }}` of a Grafana legend, `$labels.name` of an alert template.
fn template_labels(text: &str) -> Vec<String> {
    let mut labels = Vec::new();
    for (start, marker) in [("{{", "}}"), ("$labels.", "")] {
        let mut rest = text;
        while let Some(at) = rest.find(start) {
            rest = &rest[at + start.len()..];
            let end = if marker.is_empty() {
                rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len())
            } else {
                rest.find(marker).unwrap_or(rest.len())
            };
            let name = rest[..end].trim();
            // Alert templates use {{ … }} for Go templates: only bare label names count here.
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                labels.push(name.to_owned());
            }
        }
    }
    labels
}

// --- What the relay exposes ---------------------------------------------------------------------

/// Every series name a relay showed, with the values each of its labels took.
#[derive(Debug, Default)]
struct Exposed {
    series: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

impl Exposed {
    fn from_scrape(scrape: &Scrape) -> Self {
        let mut exposed = Self::default();
        for sample in &scrape.samples {
            let labels = exposed.series.entry(sample.name.clone()).or_default();
            for (label, value) in &sample.labels {
                labels.entry(label.clone()).or_default().insert(value.clone());
            }
        }
        for name in PROMETHEUS_SERIES {
            exposed.series.insert(name.to_owned(), BTreeMap::new());
        }
        exposed
    }

    /// What is wrong with `expr` (found at `place`); `shown` are the labels its legend or
    /// annotations show.
    fn problems(&self, place: &str, expr: &str, shown: &[String]) -> Vec<String> {
        let query = match read_promql(expr) {
            Ok(query) => query,
            Err(e) => return vec![format!("{place}: cannot read `{expr}`: {e}")],
        };
        let mut problems = Vec::new();
        if query.selectors.is_empty() {
            problems.push(format!("{place}: `{expr}` names no series"));
        }
        let mut labels_here: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
        for selector in &query.selectors {
            let Some(labels) = self.series.get(&selector.name) else {
                problems.push(format!("{place}: `{}` is not a series the relay exposes", selector.name));
                continue;
            };
            labels_here.extend(labels.keys().map(String::as_str));
            for Matcher { label, op, value } in &selector.matchers {
                if TARGET_LABELS.contains(&label.as_str()) {
                    if label == "job" && !value.contains('$') && value != JOB {
                        problems.push(format!("{place}: job {value:?}: the files assume the scrape job {JOB:?}"));
                    }
                    continue;
                }
                let Some(values) = labels.get(label) else {
                    problems.push(format!("{place}: `{}` has no label `{label}`", selector.name));
                    continue;
                };
                if value.contains('$') {
                    continue;
                }
                // Equality, or a regex that is an alternation of plain words (sent|retry): each
                // value must be one the series takes. Other regexes (5..) are not checked.
                let plain = |v: &str| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                let literal: Vec<&str> = match op.as_str() {
                    "=" | "!=" => vec![value.as_str()],
                    _ if value.split('|').all(plain) => value.split('|').collect(),
                    _ => Vec::new(),
                };
                for v in literal {
                    let rare =
                        RARE_LABEL_VALUES.iter().any(|(s, l, rv, _)| *s == selector.name && l == label && *rv == v);
                    if !values.contains(v) && !rare {
                        problems.push(format!(
                            "{place}: `{}{{{label}{op}{value:?}}}`: the relay shows no {label}={v:?} (it showed {values:?})",
                            selector.name
                        ));
                    }
                }
            }
        }
        for label in query.grouping.iter().chain(shown) {
            if !labels_here.contains(label.as_str()) {
                problems.push(format!("{place}: label `{label}` is on none of the series of `{expr}`"));
            }
        }
        let mut seen = BTreeSet::new();
        problems.retain(|problem| seen.insert(problem.clone()));
        problems
    }
}

// --- The files ------------------------------------------------------------------------------

/// One PromQL expression of the files: where it is, the expression, the labels it shows.
struct Usage {
    place: String,
    expr: String,
    shown: Vec<String>,
}

fn alert_rules() -> Vec<Value> {
    let documents = yaml_documents(&Path::new(ROOT).join(ALERTS));
    assert_eq!(documents.len(), 1, "{ALERTS}: one document");
    let groups = documents[0]["groups"].as_array().expect("groups").clone();
    groups.iter().flat_map(|g| g["rules"].as_array().expect("rules of each group").clone()).collect()
}

fn alert_usages() -> Vec<Usage> {
    alert_rules()
        .iter()
        .map(|rule| {
            let name = str_of(&rule["alert"], "alert");
            let annotations: Vec<String> = rule["annotations"]
                .as_object()
                .map(|a| a.values().filter_map(Value::as_str).flat_map(template_labels).collect())
                .unwrap_or_default();
            Usage {
                place: format!("{ALERTS} {name}"),
                expr: str_of(&rule["expr"], "expr").to_owned(),
                shown: annotations,
            }
        })
        .collect()
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<Value> {
    fn walk(panels: &Value, out: &mut Vec<Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            out.push(panel.clone());
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `label_values(selector, label)`, Grafana's variable query, as the selector and the label.
fn label_values_query(query: &str) -> Option<(String, String)> {
    let inner = query.trim().strip_prefix("label_values(")?.strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim().to_owned(), label.trim().to_owned()))
}

fn dashboard_usages() -> Vec<Usage> {
    let dashboard = dashboard();
    let mut usages = Vec::new();
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = str_of(&target["expr"], "a target's expr");
            usages.push(Usage {
                place: format!("{DASHBOARD} panel {title:?} {}", target["refId"]),
                expr: expr.to_owned(),
                shown: target["legendFormat"].as_str().map(template_labels).unwrap_or_default(),
            });
        }
    }
    for variable in dashboard["templating"]["list"].as_array().expect("templating.list") {
        if variable["type"] != "query" {
            continue;
        }
        let query = variable["query"]["query"].as_str().or(variable["query"].as_str()).expect("a variable's query");
        let (selector, label) = label_values_query(query)
            .unwrap_or_else(|| panic!("variable {}: not label_values(…): {query}", variable["name"]));
        usages.push(Usage {
            place: format!("{DASHBOARD} variable {}", variable["name"]),
            expr: selector,
            shown: vec![label],
        });
    }
    usages
}

fn ops_file_problems(exposed: &Exposed) -> Vec<String> {
    alert_usages()
        .iter()
        .chain(&dashboard_usages())
        .flat_map(|usage| exposed.problems(&usage.place, &usage.expr, &usage.shown))
        .collect()
}

// --- Tests of the reader and the checker, with made-up exposition ---------------------------

fn exposed_from(text: &str) -> Exposed {
    Exposed::from_scrape(&parse(text).unwrap_or_else(|e| panic!("{e}")))
}

const MADE_UP_EXPOSITION: &str = "\
# TYPE bonychat_relay_delivery_attempts_total counter
bonychat_relay_delivery_attempts_total{channel=\"default\",direction=\"outbound\",outcome=\"sent\"} 3
bonychat_relay_delivery_attempts_total{channel=\"default\",direction=\"inbound\",outcome=\"retry\"} 1
# TYPE bonychat_relay_http_request_duration_seconds histogram
bonychat_relay_http_request_duration_seconds_bucket{route=\"/message\",channel=\"default\",method=\"POST\",le=\"+Inf\"} 2
bonychat_relay_http_request_duration_seconds_sum{route=\"/message\",channel=\"default\",method=\"POST\"} 0.1
bonychat_relay_http_request_duration_seconds_count{route=\"/message\",channel=\"default\",method=\"POST\"} 2
";

#[test]
fn the_promql_reader_finds_series_matchers_and_grouping_labels() {
    let query = read_promql(
        r#"sum by (channel, direction) (rate(bonychat_relay_delivery_attempts_total{outcome=~"retry|dead", channel!=""}[$__rate_interval]))
             / on (channel) group_left sum without (le) (x_total offset 1h) > 0.25 # a comment naming not_a_series"#,
    )
    .unwrap();

    let names: Vec<&str> = query.selectors.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["bonychat_relay_delivery_attempts_total", "x_total"]);
    assert_eq!(
        query.selectors[0].matchers,
        [
            Matcher { label: "outcome".into(), op: "=~".into(), value: "retry|dead".into() },
            Matcher { label: "channel".into(), op: "!=".into(), value: String::new() },
        ]
    );
    let grouping: Vec<&str> = query.grouping.iter().map(String::as_str).collect();
    assert_eq!(grouping, ["channel", "direction", "le"]);
    let histogram = read_promql(
        r#"histogram_quantile(0.99, sum by (le) (rate(h_bucket{job=~"$job", a="b\"c"}[5m:1m]))) and deriv(g[30m:1m]) > 1e3"#,
    )
    .unwrap();
    assert_eq!(histogram.selectors.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["h_bucket", "g"]);
    assert_eq!(histogram.selectors[0].matchers[1].value, "b\"c");

    assert!(read_promql("rat(x[5m])").unwrap_err().contains("`rat` is not a PromQL function"));
    assert!(read_promql(r#"{__name__="x"}"#).is_err());
    assert!(read_promql(r#"x{a="b"#).is_err());
    assert_eq!(
        template_labels("{{route}} {{ status }} {{ $value | humanize }} $labels.channel"),
        ["route", "status", "channel"]
    );
    assert_eq!(
        label_values_query(r#"label_values(q{job=~"$job"}, channel)"#),
        Some((r#"q{job=~"$job"}"#.to_owned(), "channel".to_owned()))
    );
}

/// The checker itself fails on what it is there to catch: a misspelled series, a bare histogram
/// name, a label the series lacks, a value it never takes, a grouping or legend label nowhere.
#[test]
fn the_series_check_catches_wrong_names_labels_and_values() {
    let exposed = exposed_from(MADE_UP_EXPOSITION);
    let fine = [
        r#"sum by (channel, direction) (rate(bonychat_relay_delivery_attempts_total{job="bonychat-relay", outcome=~"sent|retry"}[5m]))"#,
        r#"histogram_quantile(0.99, sum by (le, route) (rate(bonychat_relay_http_request_duration_seconds_bucket{route=~"/message|/channels/.+"}[5m])))"#,
        r#"up{job="bonychat-relay"} == 0"#,
    ];
    for expr in fine {
        assert_eq!(exposed.problems("t", expr, &[]), Vec::<String>::new(), "{expr}");
    }
    let wrong = [
        ("rate(bonychat_relay_delivery_attempt_total[5m])", "is not a series the relay exposes"),
        ("rate(bonychat_relay_http_request_duration_seconds[5m])", "is not a series the relay exposes"),
        (r#"bonychat_relay_delivery_attempts_total{state="dead"}"#, "has no label `state`"),
        (r#"bonychat_relay_delivery_attempts_total{outcome="failed"}"#, "shows no outcome=\"failed\""),
        (r#"bonychat_relay_delivery_attempts_total{outcome=~"sent|failed"}"#, "shows no outcome=\"failed\""),
        (r#"sum by (chanel) (bonychat_relay_delivery_attempts_total)"#, "label `chanel` is on none"),
        (r#"up{job="relay"}"#, "the files assume the scrape job"),
    ];
    for (expr, expected) in wrong {
        let problems = exposed.problems("t", expr, &[]);
        assert!(problems.iter().any(|p| p.contains(expected)), "{expr}: {problems:?}");
    }
    let legend = exposed.problems("t", "bonychat_relay_delivery_attempts_total", &["route".to_owned()]);
    assert!(legend.iter().any(|p| p.contains("label `route` is on none")), "{legend:?}");
}

#[test]
fn rare_label_values_are_the_relays_own() {
    for (series, label, value, source) in RARE_LABEL_VALUES {
        let text = read(source);
        assert!(text.contains(&format!("\"{value}\"")), "{source} declares {label}={value:?} of {series}");
    }
}

// --- The alert rules and the dashboard, as files ---------------------------------------------

#[test]
fn every_alert_rule_names_relay_series_and_says_what_to_do() {
    let rules = alert_rules();
    let mut names = BTreeSet::new();
    for rule in &rules {
        let name = str_of(&rule["alert"], "every rule is an alerting rule with a name");
        assert!(names.insert(name.to_owned()), "{name} twice");
        assert!(name.starts_with("BonyChatRelay"), "{name}: named after the relay");
        let severity = rule["labels"]["severity"].as_str();
        assert!(matches!(severity, Some("critical" | "warning" | "info")), "{name}: severity {severity:?}");
        for annotation in ["summary", "description"] {
            let text = rule["annotations"][annotation].as_str().unwrap_or_default();
            assert!(text.split_whitespace().count() >= 4, "{name}: {annotation} says what happened: {text:?}");
        }
        let query = read_promql(str_of(&rule["expr"], "expr")).unwrap_or_else(|e| panic!("{name}: {e}"));
        for selector in &query.selectors {
            let known =
                selector.name.starts_with("bonychat_relay_") || PROMETHEUS_SERIES.contains(&selector.name.as_str());
            assert!(known, "{name}: {} is neither the relay's nor Prometheus' own", selector.name);
        }
    }
    assert!(rules.len() >= 15, "{} rules", rules.len());
    let mentioned: BTreeSet<String> = alert_usages()
        .iter()
        .flat_map(|u| read_promql(&u.expr).unwrap().selectors.into_iter().map(|s| s.name))
        .collect();
    for needed in [
        "up",
        "bonychat_relay_store_writable",
        "bonychat_relay_queue_jobs",
        "bonychat_relay_delivery_attempts_total",
        "bonychat_relay_joinchat_throttles_total",
        "bonychat_relay_secret_matches_total",
        "bonychat_relay_config_reloads_total",
    ] {
        assert!(mentioned.contains(needed), "no rule watches {needed}");
    }
}

#[test]
fn the_dashboard_is_a_grafana_model_on_a_prometheus_datasource_variable() {
    let dashboard = dashboard();
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(
        dashboard["uid"].as_str().is_some_and(|u| !u.is_empty() && u.len() <= 40),
        "a uid of at most 40 characters"
    );
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 30), "a current dashboard model");
    let variables = dashboard["templating"]["list"].as_array().expect("templating.list");
    let datasource = variables.iter().find(|v| v["type"] == "datasource").expect("a data source variable");
    assert_eq!(datasource["query"], "prometheus");
    let datasource_ref = json!({"type": "prometheus", "uid": format!("${{{}}}", str_of(&datasource["name"], "name"))});

    let panels = panels(&dashboard);
    let mut ids = BTreeSet::new();
    let mut queries = 0;
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "every panel has a title: {panel}");
        assert!(ids.insert(panel["id"].as_u64().expect("a numeric panel id")), "panel id {} twice", panel["id"]);
        for field in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][field].is_u64(), "{title}: gridPos.{field}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], datasource_ref, "{title}: on the data source variable");
        let targets =
            panel["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panic!("{title}: queries"));
        for target in targets {
            assert!(target["expr"].as_str().is_some_and(|e| !e.trim().is_empty()), "{title}: an expr");
            assert_eq!(target["datasource"], datasource_ref, "{title}: each query on the data source variable");
            queries += 1;
        }
    }
    assert!(queries >= 20, "{queries} queries");
    let series: BTreeSet<String> = dashboard_usages()
        .iter()
        .flat_map(|u| read_promql(&u.expr).unwrap_or_else(|e| panic!("{}: {e}", u.place)).selectors)
        .map(|s| s.name)
        .collect();
    for needed in [
        "bonychat_relay_http_requests_total",
        "bonychat_relay_delivery_attempts_total",
        "bonychat_relay_queue_jobs",
        "bonychat_relay_http_request_duration_seconds_bucket",
        "bonychat_relay_delivery_latency_seconds_bucket",
        "bonychat_relay_store_commit_duration_seconds_bucket",
    ] {
        assert!(series.contains(needed), "no panel shows {needed}");
    }
}

// --- The real relay's series -----------------------------------------------------------------

/// A token BonyChat used before a rotation, still accepted as the previous one.
const OLD_API_TOKEN: &str = "bonychat-token-before-the-rotation";
const UNKNOWN_PAGE: &str = "999999999999999";

async fn scrape_page(metrics: SocketAddr) -> Scrape {
    let text = http_client()
        .get(format!("http://{metrics}/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .unwrap();
    parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

async fn wait_for_line(relay: &RelayProcess, text: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while relay.output().iter().filter(|line| line.contains(text)).count() < count {
        assert!(Instant::now() < deadline, "no {text:?} in {:?}", relay.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signed_webhook(entry_page: &str, mid: &str) -> (Vec<u8>, String) {
    let body = json!({"object": "page", "entry": [{"id": entry_page, "time": 1_700_000_000_000_i64, "messaging": [
        {"sender": {"id": PSID}, "recipient": {"id": entry_page}, "timestamp": 1_700_000_000_000_i64, "message": {"mid": mid, "text": "hi"}},
        {"sender": {"id": PSID}, "recipient": {"id": entry_page}, "timestamp": 1, "reaction": {"mid": mid, "action": "react", "emoji": "👍"}}
    ]}]})
    .to_string()
    .into_bytes();
    let signature = hub_signature(APP_SECRET, &body);
    (body, signature)
}

/// The strongest check of the files: the relay binary, started with a JoinChat and a BonyChat
/// stand-in, does what makes its series appear; then every series, label and label value the
/// alert rules and the dashboard name must be on its `/metrics` page.
#[tokio::test]
async fn every_series_the_alert_rules_and_the_dashboard_name_is_on_a_running_relays_metrics_page() {
    // Arrange: the binary, one secret in a file (for reloads), a previous BonyChat token.
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    let bonychat = StandIn::bonychat(API_TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("joinchat-api-secret");
    std::fs::write(&secret_file, format!("{JOINCHAT_SECRET}\n")).unwrap();
    let mut vars = test_vars(&joinchat.url, dir.path());
    vars.retain(|(k, _)| !["JOINCHAT_API_SECRET", "BONYCHAT_WEBHOOK_URL"].contains(&k.as_str()));
    vars.extend([
        ("JOINCHAT_API_SECRET_FILE".to_owned(), secret_file.display().to_string()),
        ("BONYCHAT_WEBHOOK_URL".to_owned(), bonychat.url.clone()),
        ("BONYCHAT_API_TOKEN_PREVIOUS".to_owned(), OLD_API_TOKEN.to_owned()),
        ("JOINCHAT_ORDER_GAP_SECS".to_owned(), "0".to_owned()),
    ]);
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &[]).await;
    let metrics: SocketAddr = relay
        .output()
        .iter()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|event| event["message"] == "relay listening")
        .and_then(|event| event["metrics_addr"].as_str()?.parse().ok())
        .expect("the start line names the metrics address");
    let http = http_client();
    let send = |contact: &str, token: &str| {
        http.post(relay.url("/message"))
            .bearer_auth(token)
            .json(&json!({"channelId": CHANNEL_ID, "contactId": contact, "message": {"type": "text", "text": "hello"}}))
            .send()
    };

    // Act: delivered; with the previous token; refused for want of a token.
    assert_eq!(send(PSID, API_TOKEN).await.unwrap().status(), 200);
    assert_eq!(send(PSID, OLD_API_TOKEN).await.unwrap().status(), 200);
    assert_eq!(http.post(relay.url("/message")).json(&json!({})).send().await.unwrap().status(), 401);
    // Refused for good by JoinChat.
    joinchat.script([Reply::status(400, r#"{"success":false,"errors":{"msg":"User blocked the page"}}"#)]);
    assert_eq!(send("2066835436691078", API_TOKEN).await.unwrap().status(), 400);
    // Throttled, then sent once the pause is over.
    joinchat.script([Reply::status(429, "slow down").retry_after("1")]);
    send("3066835436691078", API_TOKEN).await.unwrap();
    joinchat.wait_for(5).await;
    // Failed until out of retries: a dead letter, and its `failed` receipt to BonyChat.
    joinchat.script((0..4).map(|_| Reply::status(500, "")));
    assert_eq!(send("4066835436691078", API_TOKEN).await.unwrap().status(), 200);
    // Webhooks: a message and a reaction twice (a duplicate, ignored items), an unknown Page.
    for (page, mid) in [(PAGE_ID, "m-ops-1"), (PAGE_ID, "m-ops-1"), (UNKNOWN_PAGE, "m-ops-2")] {
        let (body, signature) = signed_webhook(page, mid);
        let answer = http
            .post(relay.url("/webhooks/messenger"))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", signature)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    // Reloads: one applied, one refused (a blank secret file).
    relay.signal("HUP").await;
    wait_for_line(&relay, "SIGHUP: configuration reloaded", 1).await;
    std::fs::write(&secret_file, "").unwrap();
    relay.signal("HUP").await;
    wait_for_line(&relay, "SIGHUP: configuration refused", 1).await;
    std::fs::write(&secret_file, format!("{JOINCHAT_SECRET}\n")).unwrap();
    // Silent sockets crowding the metrics port.
    let flood = SilentFlood::start(metrics, 24).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(flood.stop().await > 0, "the metrics listener closed silent sockets");

    // Assert: scraped until every series is there (retries and receipts take a moment).
    let deadline = Instant::now() + Duration::from_secs(30);
    let problems = loop {
        tokio::time::sleep(SCRAPE_CACHE_PERIOD + Duration::from_millis(100)).await;
        let problems = ops_file_problems(&Exposed::from_scrape(&scrape_page(metrics).await));
        if problems.is_empty() || Instant::now() > deadline {
            break problems;
        }
    };
    relay.terminate().await;
    assert!(problems.is_empty(), "the operations files name what the relay does not show:\n{}", problems.join("\n"));
}

// --- The Kubernetes examples -----------------------------------------------------------------

/// The documents of every `*.yaml` of an example's folder.
fn example(dir: &str) -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(Path::new(ROOT).join(dir))
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{dir}: manifests");
    files.iter().flat_map(|file| yaml_documents(file)).collect()
}

fn of_kind<'a>(documents: &'a [Value], kind: &str) -> Vec<&'a Value> {
    documents.iter().filter(|d| d["kind"] == kind).collect()
}

fn workload<'a>(dir: &str, documents: &'a [Value]) -> &'a Value {
    let workloads: Vec<&Value> =
        documents.iter().filter(|d| d["kind"] == "Deployment" || d["kind"] == "StatefulSet").collect();
    assert_eq!(workloads.len(), 1, "{dir}: one Deployment or StatefulSet");
    workloads[0]
}

fn relay_container<'a>(dir: &str, workload: &'a Value) -> &'a Value {
    let containers = workload["spec"]["template"]["spec"]["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "{dir}: the relay's container alone");
    &containers[0]
}

/// The container's variables, each with a plain value: secrets come through `<NAME>_FILE`.
fn container_env(dir: &str, container: &Value) -> Vec<(String, String)> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|entry| {
            let name = str_of(&entry["name"], "env name");
            assert!(entry.get("valueFrom").is_none(), "{dir}: {name} from valueFrom: secrets go through <NAME>_FILE");
            (name.to_owned(), str_of(&entry["value"], &format!("{dir}: {name}'s value")).to_owned())
        })
        .collect()
}

/// The variables the image sets (`ENV` of the Dockerfile's last stage): a pod starts with them.
fn image_env() -> Vec<(String, String)> {
    let dockerfile = read("Dockerfile");
    let last_stage = &dockerfile[dockerfile.rfind("\nFROM ").expect("a FROM")..];
    let joined = last_stage.replace("\\\n", " ");
    let env: Vec<(String, String)> = joined
        .lines()
        .filter_map(|line| line.strip_prefix("ENV "))
        .flat_map(|pairs| pairs.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or_else(|| panic!("ENV {pair}: NAME=value"));
            (name.to_owned(), value.to_owned())
        })
        .collect();
    assert!(env.iter().any(|(name, _)| name == "RELAY_DATABASE_URL"), "the image's ENV: {env:?}");
    env
}

/// The image's user id (`USER uid:gid`).
fn image_uid() -> u64 {
    let dockerfile = read("Dockerfile");
    let user = dockerfile.lines().rev().find_map(|line| line.strip_prefix("USER ")).expect("USER");
    user.split(':').next().unwrap().trim().parse().expect("a numeric USER")
}

/// A probe's or Service's port (a number or a container port's name) as a number.
fn port_number(container: &Value, port: &Value) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    let name = str_of(port, "port");
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

fn addr_port(addr: &str) -> u64 {
    addr.rsplit_once(':').and_then(|(_, port)| port.parse().ok()).unwrap_or_else(|| panic!("{addr}: no port"))
}

/// Where a `*_FILE` path lands: the Secret and key of the mounted secret volume holding it.
fn secret_file_source<'a>(dir: &str, documents: &'a [Value], workload: &Value, path: &str) -> (&'a Value, String) {
    let container = relay_container(dir, workload);
    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    let mount = mounts
        .iter()
        .find(|m| path.strip_prefix(str_of(&m["mountPath"], "mountPath")).is_some_and(|rest| rest.starts_with('/')))
        .unwrap_or_else(|| panic!("{dir}: {path} is on no mounted volume"));
    assert_eq!(mount["readOnly"], true, "{dir}: the secrets' mount is read-only");
    let volumes = workload["spec"]["template"]["spec"]["volumes"].as_array().expect("volumes");
    let volume = volumes.iter().find(|v| v["name"] == mount["name"]).expect("the mount's volume");
    let secret_name = volume["secret"]["secretName"]
        .as_str()
        .unwrap_or_else(|| panic!("{dir}: {path} is on volume {}, not a Secret", volume["name"]));
    let mut key = path[str_of(&mount["mountPath"], "").len() + 1..].to_owned();
    if let Some(items) = volume["secret"]["items"].as_array() {
        let item = items.iter().find(|i| i["path"] == key.as_str()).unwrap_or_else(|| panic!("{dir}: {path}: no item"));
        key = str_of(&item["key"], "key").to_owned();
    }
    let secret = of_kind(documents, "Secret")
        .into_iter()
        .find(|s| s["metadata"]["name"] == secret_name)
        .unwrap_or_else(|| panic!("{dir}: no Secret {secret_name} in the example"));
    (secret, key)
}

fn secret_value(secret: &Value, key: &str) -> Option<String> {
    if let Some(value) = secret["stringData"][key].as_str() {
        return Some(value.to_owned());
    }
    secret["data"][key].as_str().map(|encoded| {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).expect("base64 data");
        String::from_utf8(bytes).expect("UTF-8")
    })
}

/// Runs `bonychat-relay check-config` in the environment the example's pod would have: the
/// image's variables, then the manifest's, each `*_FILE` moved under a temporary directory
/// holding a made-up value (empty where the Secret's value is empty, as for a previous value
/// outside a rotation), and a URL on a host reserved for examples made up too. Returns the
/// configuration in effect, or fails with what the relay said.
async fn check_config_of(dir: &str, documents: &[Value]) -> BTreeMap<String, String> {
    let workload = workload(dir, documents);
    let env = container_env(dir, relay_container(dir, workload));
    let files = tempfile::tempdir().unwrap();
    let mut vars: BTreeMap<String, String> = image_env().into_iter().collect();
    for (name, value) in &env {
        let mut value = value.clone();
        if name.ends_with("_FILE") {
            let (secret, key) = secret_file_source(dir, documents, workload, &value);
            let held =
                secret_value(secret, &key).unwrap_or_else(|| panic!("{dir}: {name}: no key {key} in the Secret"));
            let made_up = match (held.is_empty(), name.as_str()) {
                (true, _) => String::new(),
                (false, "RELAY_DATABASE_URL_FILE") => "postgres://relay:made-up@db.test:5432/relay\n".to_owned(),
                (false, _) => format!("made-up-{key}\n"),
            };
            let moved = files.path().join(value.trim_start_matches('/'));
            std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
            std::fs::write(&moved, made_up).unwrap();
            value = moved.display().to_string();
        } else if value.contains(".example/") {
            // "Replace with your own", as the operator does: the relay refuses the example's.
            value = crate::first_day::made_up(name);
        }
        vars.insert(name.clone(), value);
    }
    let vars: Vec<(String, String)> = vars.into_iter().collect();
    let (code, stdout, stderr) = run_binary(&vars, &["check-config"]).await;
    assert_eq!(code, Some(0), "{dir}: check-config refused the example's environment:\n{stderr}");
    assert!(!stderr.contains("warning"), "{dir}: check-config warned:\n{stderr}");
    let effective: BTreeMap<String, String> = stdout
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    // A secret in effect came from a file, never from a plain variable of the manifest.
    for (name, value) in &effective {
        if value.contains("[redacted]") {
            let direct = env.iter().find(|(n, v)| n == name && !v.is_empty());
            assert!(direct.is_none(), "{dir}: the secret {name} is set in the manifest: use {name}_FILE");
            assert!(env.iter().any(|(n, _)| *n == format!("{name}_FILE")), "{dir}: {name} not from a file");
        }
    }
    effective
}

#[test]
fn the_kubernetes_examples_run_one_sqlite_relay_on_a_volume_and_three_postgres_replicas() {
    let sqlite = example(KUBERNETES_SQLITE);
    let deployment = workload(KUBERNETES_SQLITE, &sqlite);
    assert_eq!(deployment["kind"], "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1, "one relay per SQLite store");
    assert_eq!(
        deployment["spec"]["strategy"]["type"], "Recreate",
        "the old relay stops before the new one opens the store"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    let data = relay_container(KUBERNETES_SQLITE, deployment)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/data")
        .expect("a volume at /data");
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == data["name"]).unwrap();
    let claim = str_of(&volume["persistentVolumeClaim"]["claimName"], "/data is a PersistentVolumeClaim");
    assert!(
        of_kind(&sqlite, "PersistentVolumeClaim").iter().any(|c| c["metadata"]["name"] == claim),
        "the claim {claim} is in the example"
    );

    let postgres = example(KUBERNETES_POSTGRES);
    let deployment = workload(KUBERNETES_POSTGRES, &postgres);
    assert_eq!(deployment["spec"]["replicas"], 3, "three replicas on one database");
    assert!(of_kind(&postgres, "PersistentVolumeClaim").is_empty(), "replicas keep nothing on disk");
    let volumes = deployment["spec"]["template"]["spec"]["volumes"].as_array().unwrap();
    assert!(volumes.iter().all(|v| v.get("persistentVolumeClaim").is_none()), "no volume: {volumes:?}");
    let env = container_env(KUBERNETES_POSTGRES, relay_container(KUBERNETES_POSTGRES, deployment));
    assert!(env.iter().any(|(name, _)| name == "RELAY_DATABASE_URL_FILE"), "the database URL from the Secret");
}

#[test]
fn the_kubernetes_examples_probe_serve_and_run_as_the_relay_expects() {
    for dir in [KUBERNETES_SQLITE, KUBERNETES_POSTGRES] {
        let documents = example(dir);
        let workload = workload(dir, &documents);
        let pod = &workload["spec"]["template"]["spec"];
        let container = relay_container(dir, workload);
        let env: BTreeMap<String, String> = container_env(dir, container).into_iter().collect();
        let image_defaults: BTreeMap<String, String> = image_env().into_iter().collect();
        let setting = |name: &str| env.get(name).or(image_defaults.get(name)).cloned();

        // The image the README builds, at this version.
        let image = str_of(&container["image"], "image");
        let (name, tag) = image.rsplit('/').next().unwrap().split_once(':').expect("a tagged image");
        assert_eq!((name, tag), ("bonychat-relay", env!("CARGO_PKG_VERSION")), "{dir}: {image}");

        // Probes and ports: the API where RELAY_ADDR listens, the metrics where RELAY_METRICS_ADDR does.
        let api = setting("RELAY_ADDR").expect("RELAY_ADDR");
        let metrics = setting("RELAY_METRICS_ADDR").expect("RELAY_METRICS_ADDR");
        assert!(
            metrics.starts_with("0.0.0.0:"),
            "{dir}: the metrics listener reachable from outside the pod: {metrics}"
        );
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &container[probe]["httpGet"];
            assert_eq!(get["path"], path, "{dir}: {probe}");
            assert_eq!(port_number(container, &get["port"]), addr_port(&api), "{dir}: {probe} on RELAY_ADDR's port");
        }
        if let Some(startup) = container.get("startupProbe") {
            assert_eq!(port_number(container, &startup["httpGet"]["port"]), addr_port(&api), "{dir}: startupProbe");
        }
        let ports: Vec<u64> =
            container["ports"].as_array().unwrap().iter().filter_map(|p| p["containerPort"].as_u64()).collect();
        assert!(ports.contains(&addr_port(&metrics)), "{dir}: the metrics port {metrics} is declared: {ports:?}");
        let annotations = &workload["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/port"], addr_port(&metrics).to_string(), "{dir}: scrape annotation");

        // The Service: the pods' API port only.
        let services = of_kind(&documents, "Service");
        assert_eq!(services.len(), 1, "{dir}: one Service");
        let labels = workload["spec"]["template"]["metadata"]["labels"].as_object().expect("pod labels");
        for (key, value) in services[0]["spec"]["selector"].as_object().expect("a selector") {
            assert_eq!(labels.get(key), Some(value), "{dir}: the Service selects the relay's pods");
        }
        for port in services[0]["spec"]["ports"].as_array().unwrap() {
            assert_eq!(
                port_number(container, &port["targetPort"]),
                addr_port(&api),
                "{dir}: the Service serves the API only"
            );
        }

        // Not root, no privilege, a read-only root file system.
        let security = &container["securityContext"];
        let non_root = security["runAsNonRoot"].as_bool().or(pod["securityContext"]["runAsNonRoot"].as_bool());
        assert_eq!(non_root, Some(true), "{dir}: runAsNonRoot");
        let uid = security["runAsUser"].as_u64().or(pod["securityContext"]["runAsUser"].as_u64());
        assert_eq!(uid, Some(image_uid()), "{dir}: the image's user");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{dir}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{dir}");
        assert!(
            security["capabilities"]["drop"].as_array().is_some_and(|d| d.contains(&json!("ALL"))),
            "{dir}: drop ALL"
        );
        assert_eq!(pod["automountServiceAccountToken"], false, "{dir}: the relay needs no API token");

        // Resources, and time to finish in-flight work after SIGTERM.
        for resource in ["requests", "limits"] {
            assert!(container["resources"][resource]["memory"].is_string(), "{dir}: resources.{resource}.memory");
        }
        let grace: u64 = setting("RELAY_SHUTDOWN_GRACE_SECS").unwrap_or("10".into()).parse().unwrap();
        let period = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
        assert!(period > grace, "{dir}: terminationGracePeriodSeconds {period} > RELAY_SHUTDOWN_GRACE_SECS {grace}");
    }
}

#[tokio::test]
async fn every_variable_of_the_kubernetes_examples_is_one_the_relay_takes_with_secrets_from_the_mounted_secret() {
    for dir in [KUBERNETES_SQLITE, KUBERNETES_POSTGRES] {
        let documents = example(dir);
        let workload = workload(dir, &documents);
        let env = container_env(dir, relay_container(dir, workload));
        let files: Vec<&(String, String)> = env.iter().filter(|(name, _)| name.ends_with("_FILE")).collect();
        assert!(files.len() >= 4, "{dir}: the secrets come from files: {env:?}");
        for (name, path) in &files {
            let (secret, key) = secret_file_source(dir, &documents, workload, path);
            assert!(secret_value(secret, &key).is_some(), "{dir}: {name}: the Secret has no key {key}");
        }

        let effective = check_config_of(dir, &documents).await;

        let database = &effective["RELAY_DATABASE_URL"];
        if dir == KUBERNETES_SQLITE {
            let path = database.strip_prefix("sqlite://").expect("a SQLite store");
            let mounts = relay_container(dir, workload)["volumeMounts"].as_array().unwrap();
            assert!(
                mounts
                    .iter()
                    .any(|m| path.strip_prefix(m["mountPath"].as_str().unwrap()).is_some_and(|r| r.starts_with('/'))),
                "{dir}: the store {path} is on the mounted volume"
            );
        } else {
            assert!(database.starts_with("postgres://"), "{dir}: {database}");
        }
    }
}
