//! SPEC §6: `GET /metrics` on `RELAY_METRICS_ADDR`, in the Prometheus text format, moving by
//! what the relay did, with no contact or message id as a label; served to Prometheus despite
//! idle sockets on its port, and at the cost of one render a second however often it is asked.
//!
//! The series are process-wide and the other tests of this binary run relays in parallel, so
//! the tests that check exact amounts run themselves again in a child process, alone.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use bonychat_relay::monitoring::SCRAPE_CACHE_PERIOD;
use serde_json::json;
use tokio::time::Instant;

use crate::helpers::{
    PAGE_ID, PSID, Reply, SilentFlood, TestApp, assert_error, http_client_from, spawn_app, spawn_app_with, text,
};

/// A second contact, for the message that ends dead.
const OTHER_CONTACT: &str = "2066835436691078";
const CHILD: &str = "BONYCHAT_RELAY_METRICS_ALONE";

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample {
    pub(crate) name: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) value: f64,
}

#[derive(Debug, Default)]
pub(crate) struct Scrape {
    pub(crate) types: BTreeMap<String, String>,
    pub(crate) helps: BTreeMap<String, String>,
    pub(crate) samples: Vec<Sample>,
}

impl Scrape {
    /// The sum of the samples of `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .sum()
    }

    fn label_values(&self) -> impl Iterator<Item = &str> {
        self.samples.iter().flat_map(|s| s.labels.values().map(String::as_str))
    }
}

/// A strict parser of the text format 0.0.4: `# HELP`, `# TYPE` and sample lines only, every
/// sample of a family with a `TYPE` before it, names and label names well formed.
pub(crate) fn parse(text: &str) -> Result<Scrape, String> {
    let mut scrape = Scrape::default();
    for (n, line) in text.lines().enumerate() {
        let fail = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut words = rest.splitn(3, ' ');
            let (keyword, name, tail) = (words.next(), words.next(), words.next());
            let name = name.filter(|n| is_metric_name(n)).ok_or_else(|| fail("bad metric name"))?;
            match (keyword, tail) {
                (Some("TYPE"), Some(kind @ ("counter" | "gauge" | "histogram" | "summary" | "untyped"))) => {
                    if scrape.types.insert(name.to_owned(), kind.to_owned()).is_some() {
                        return Err(fail("second TYPE"));
                    }
                }
                (Some("HELP"), Some(help)) => {
                    scrape.helps.insert(name.to_owned(), help.to_owned());
                }
                _ => return Err(fail("unknown comment")),
            }
            continue;
        }
        if line.starts_with('#') {
            return Err(fail("comment without a space"));
        }
        let (series, value) = line.rsplit_once(' ').ok_or_else(|| fail("no value"))?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other.parse::<f64>().map_err(|_| fail("bad value"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                (name, parse_labels(rest.strip_suffix('}').ok_or_else(|| fail("unclosed {"))?).map_err(|e| fail(&e))?)
            }
        };
        if !is_metric_name(name) {
            return Err(fail("bad metric name"));
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| scrape.types.get(*base).is_some_and(|t| t == "histogram" || t == "summary"))
            })
            .unwrap_or(name);
        if !scrape.types.contains_key(family) {
            return Err(fail("sample before its TYPE"));
        }
        scrape.samples.push(Sample { name: name.to_owned(), labels, value });
    }
    Ok(scrape)
}

fn parse_labels(mut rest: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"").ok_or("label without =\"")?;
        if !is_label_name(name) {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(labels)
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

async fn scrape(app: &TestApp) -> Scrape {
    let response = app.http.get(format!("http://{}/metrics", app.metrics_addr)).send().await.expect("metrics answer");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(content_type, "text/plain; version=0.0.4");
    let text = response.text().await.unwrap();
    parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn webhook(mid: &str) -> Vec<u8> {
    json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1_700_000_000_000_i64, "messaging": [
        {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1_700_000_000_000_i64, "message": {"mid": mid, "text": "hi"}},
        {"sender": {"id": PSID}, "recipient": {"id": PAGE_ID}, "timestamp": 1, "reaction": {"mid": mid, "action": "react", "emoji": "👍"}}
    ]}]})
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn metrics_are_prometheus_text_on_their_own_port_only() {
    let app = spawn_app().await;

    let scraped = scrape(&app).await;
    let public = app.http.get(app.url("/metrics")).send().await.unwrap();

    let status = public.status();
    assert_error(status, &public.json().await.unwrap(), 404, "not_found");
    assert_eq!(scraped.value("bonychat_relay_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(scraped.types["bonychat_relay_build_info"], "gauge");
    assert_eq!(scraped.value("bonychat_relay_store_writable", &[]), 1.0);
    for state in ["ready", "delayed", "in_flight", "dead"] {
        assert!(
            scraped.samples.iter().any(|s| s.name == "bonychat_relay_queue_jobs"
                && s.labels["state"] == state
                && s.labels["channel"] == "default"),
            "queue_jobs{{channel=default,state={state}}} is always there"
        );
    }
    app.stop().await;
}

/// Runs `test` in a child process, alone, so that no other relay moves the counters.
fn alone(test: &str) {
    crate::helpers::run_alone(test, CHILD);
}

#[tokio::test]
async fn the_series_move_by_what_the_relay_did_and_name_no_contact_or_message() {
    if std::env::var_os(CHILD).is_none() {
        return tokio::task::spawn_blocking(|| {
            alone("metrics::the_series_move_by_what_the_relay_did_and_name_no_contact_or_message");
        })
        .await
        .unwrap();
    }
    // No pacing: the retries below would otherwise be deferred, and their count would depend on timing.
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;
    let before = scrape(&app).await;
    let rendered = Instant::now();

    let (status, sent) = app.send(PSID, json!({"type": "text", "text": "hello"})).await;
    assert_eq!(status, 200);
    app.settle().await;
    app.joinchat.script((0..4).map(|_| Reply::status(500, "")));
    let (status, doomed) = app.send(OTHER_CONTACT, json!({"type": "text", "text": "doomed"})).await;
    assert_eq!(status, 200);
    let unauthorized = app.http.post(app.url("/message")).json(&json!({})).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);
    for _ in 0..2 {
        assert_eq!(app.post_webhook(webhook("m-metrics-1")).await.status(), 200);
    }
    let admin = app.http.post(app.url("/admin/jobs/12345/retry")).send().await.unwrap();
    assert_eq!(admin.status(), 404);
    assert_eq!(app.http.get(app.url("/no/such/path/1066835436691078")).send().await.unwrap().status(), 404);
    app.settle().await;
    // A scrape within a second of a render gets that render.
    tokio::time::sleep_until(rendered + SCRAPE_CACHE_PERIOD).await;
    let after = scrape(&app).await;

    let moved = |name: &str, labels: &[(&str, &str)]| after.value(name, labels) - before.value(name, labels);
    let requests = "bonychat_relay_http_requests_total";
    assert_eq!(moved(requests, &[("route", "/message"), ("method", "POST"), ("status", "200")]), 2.0);
    assert_eq!(moved(requests, &[("route", "/message"), ("method", "POST"), ("status", "401")]), 1.0);
    assert_eq!(moved(requests, &[("route", "/webhooks/messenger"), ("method", "POST"), ("status", "200")]), 2.0);
    // Without a token the admin API is not mounted: its paths are unknown ones.
    assert_eq!(moved(requests, &[("route", "unmatched"), ("method", "POST"), ("status", "404")]), 1.0);
    assert_eq!(moved(requests, &[("route", "unmatched"), ("method", "GET"), ("status", "404")]), 1.0);
    let duration = "bonychat_relay_http_request_duration_seconds_count";
    assert_eq!(moved(duration, &[("route", "/message"), ("method", "POST")]), 3.0);
    assert_eq!(after.types["bonychat_relay_http_request_duration_seconds"], "histogram");

    let attempts = "bonychat_relay_delivery_attempts_total";
    assert_eq!(moved(attempts, &[("direction", "outbound"), ("outcome", "sent")]), 1.0);
    assert_eq!(moved(attempts, &[("direction", "outbound"), ("outcome", "retry")]), 3.0);
    assert_eq!(moved(attempts, &[("direction", "outbound"), ("outcome", "dead")]), 1.0);
    // The message from Messenger, and the `failed` receipt of the dead message.
    assert_eq!(moved(attempts, &[("direction", "inbound"), ("outcome", "sent")]), 2.0);
    let latency = "bonychat_relay_delivery_latency_seconds_count";
    assert_eq!(moved(latency, &[("direction", "outbound")]), 1.0);
    assert_eq!(moved(latency, &[("direction", "inbound")]), 2.0);
    let latest =
        after.value("bonychat_relay_delivery_latency_seconds_bucket", &[("direction", "outbound"), ("le", "+Inf")]);
    assert_eq!(latest, after.value(latency, &[("direction", "outbound")]));

    let dropped = "bonychat_relay_inbound_events_dropped_total";
    assert_eq!(moved(dropped, &[("reason", "duplicate")]), 1.0);
    assert_eq!(moved(dropped, &[("reason", "ignored")]), 2.0, "the reaction, in each delivery");
    assert_eq!(moved(dropped, &[("reason", "own_echo")]), 0.0);
    assert_eq!(moved("bonychat_relay_receipts_posted_total", &[("value", "failed")]), 1.0);

    let queue = |direction: &str, state: &str| {
        after.value("bonychat_relay_queue_jobs", &[("channel", "default"), ("direction", direction), ("state", state)])
    };
    assert_eq!(queue("outbound", "dead"), 1.0);
    assert_eq!(queue("outbound", "ready") + queue("outbound", "delayed") + queue("outbound", "in_flight"), 0.0);
    assert_eq!(queue("inbound", "dead"), 0.0);
    assert!(moved("bonychat_relay_store_commit_duration_seconds_count", &[]) >= 1.0);
    let commits = moved("bonychat_relay_store_commit_batch_size_count", &[]);
    assert!(commits >= 1.0 && moved("bonychat_relay_store_commit_batch_size_sum", &[]) >= commits);
    assert_eq!(after.value("bonychat_relay_store_writable", &[]), 1.0);

    let ids =
        [PSID, OTHER_CONTACT, "m-metrics-1", "12345", sent["mId"].as_str().unwrap(), doomed["mId"].as_str().unwrap()];
    for value in after.label_values() {
        assert!(!ids.iter().any(|id| value.contains(id)), "an id as a label value: {value}");
    }
    for family in after.samples.iter().map(|s| &s.name).filter(|n| n.starts_with("bonychat_relay_")) {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| family.strip_suffix(s).filter(|b| after.types.contains_key(*b)))
            .unwrap_or(family);
        assert!(after.helps.contains_key(base), "{base} has a HELP line");
    }
    app.stop().await;
}

#[tokio::test]
async fn idle_sockets_on_the_metrics_port_do_not_hold_up_a_scrape() {
    let app = spawn_app().await;
    // More than the listener's 16 connections, from the scraper's own address.
    let flood = SilentFlood::start(app.metrics_addr, 24).await;
    let scraper = http_client_from(Ipv4Addr::LOCALHOST.into());

    let mut waits = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let scraped =
            scraper.get(format!("http://{}/metrics", app.metrics_addr)).timeout(Duration::from_secs(5)).send();
        let scraped = scraped.await.expect("the scrape is answered");
        assert_eq!(scraped.status(), 200);
        let page = parse(&scraped.text().await.unwrap()).unwrap();
        assert_eq!(page.value("bonychat_relay_build_info", &[]), 1.0);
        waits.push(started.elapsed());
    }

    let closed = flood.stop().await;
    assert!(waits.iter().all(|waited| *waited < Duration::from_secs(1)), "each scrape at once: {waits:?}");
    assert!(closed >= 8, "the idle sockets filled the listener ({closed} closed)");
    app.stop().await;
}

#[tokio::test]
async fn a_storm_of_scrapes_shares_one_fresh_render_a_second() {
    if std::env::var_os(CHILD).is_none() {
        return tokio::task::spawn_blocking(|| alone("metrics::a_storm_of_scrapes_shares_one_fresh_render_a_second"))
            .await
            .unwrap();
    }
    const RENDERS: &str = "bonychat_relay_metrics_renders_total";
    const REQUESTS: &str = "bonychat_relay_http_requests_total";
    const HEALTHZ: &[(&str, &str)] = &[("route", "/healthz"), ("method", "GET"), ("status", "200")];
    let app = spawn_app().await;
    let before = scrape(&app).await;
    assert_eq!(app.http.get(app.url("/healthz")).send().await.unwrap().status(), 200);
    tokio::time::sleep(SCRAPE_CACHE_PERIOD + Duration::from_millis(100)).await;

    // Twelve scrapers, under the listener's cap of 16, each scraping again as soon as answered.
    let started = Instant::now();
    let storm = Duration::from_secs(2);
    let mut scrapers = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let (client, url) = (app.http.clone(), format!("http://{}/metrics", app.metrics_addr));
        scrapers.spawn(async move {
            let mut pages = Vec::new();
            while started.elapsed() < storm {
                let answer = client.get(&url).timeout(Duration::from_secs(5)).send().await.expect("scrape answered");
                assert_eq!(answer.status(), 200);
                pages.push(answer.text().await.unwrap());
            }
            pages
        });
    }
    let pages: Vec<String> = scrapers.join_all().await.into_iter().flatten().collect();
    let took = started.elapsed();

    // Each render counts itself, so a page tells which render it is.
    let distinct: std::collections::BTreeSet<&String> = pages.iter().collect();
    let mut by_render: BTreeMap<u64, &String> = BTreeMap::new();
    for page in distinct {
        let scraped = parse(page).unwrap_or_else(|e| panic!("{e}\n{page}"));
        assert_eq!(scraped.value(REQUESTS, HEALTHZ), before.value(REQUESTS, HEALTHZ) + 1.0, "fresh");
        let render = scraped.value(RENDERS, &[]) as u64;
        assert!(by_render.insert(render, page).is_none(), "render {render} gave two different pages");
    }
    let last = *by_render.keys().last().expect("pages") as f64;
    let renders = last - before.value(RENDERS, &[]);
    let periods = took.as_secs_f64() / SCRAPE_CACHE_PERIOD.as_secs_f64();
    assert!(pages.len() >= 100, "a storm: {} scrapes in {took:?}", pages.len());
    assert!(renders <= periods.ceil() + 1.0, "{renders} renders (store reads) for {} scrapes in {took:?}", pages.len());
    app.stop().await;
}

#[test]
fn the_parser_is_strict() {
    let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\\\\\"} 3\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n";
    let parsed = parse(good).unwrap();
    assert_eq!(parsed.value("a_total", &[("y", "q\"\\")]), 3.0);
    assert_eq!(parsed.value("h_count", &[]), 2.0);
    for bad in [
        "a_total 1\n",
        "# TYPE a counter\na{x=1} 1\n",
        "# TYPE a counter\na{x=\"1\" 1\n",
        "# TYPE a counter\na one\n",
        "# TYPE 1a counter\n",
        "# TYPE a counter\n# TYPE a counter\n",
        "#TYPE a counter\n",
        "# TYPE a widget\n",
    ] {
        assert!(parse(bad).is_err(), "{bad:?}");
    }
}

/// How long the oldest queued job has waited, per channel and direction: what an alert on a
/// stuck queue reads.
#[tokio::test]
async fn the_oldest_queued_job_s_wait_is_a_gauge() {
    let app = spawn_app_with(&[("RELAY_RETRY_JOINCHAT", "30s")]).await;
    app.joinchat.script([Reply::status(503, "")]);
    let (status, _) = app.send(PSID, text("later, JoinChat is busy")).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let scraped = scrape(&app).await;
    let oldest = |direction: &str| {
        scraped.value("bonychat_relay_queue_oldest_age_seconds", &[("channel", "default"), ("direction", direction)])
    };
    assert!((1.0..30.0).contains(&oldest("outbound")), "{}", oldest("outbound"));
    assert_eq!(oldest("inbound"), 0.0, "nothing queued");
    app.stop().await;
}
