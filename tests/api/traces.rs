//! SPEC §6, traces: a message followed from BonyChat through the relay to JoinChat, and from
//! Messenger through the relay to BonyChat, as one trace, received by an OTLP/HTTP collector the
//! test runs itself (no collector package installs here). It decodes what it gets on its own
//! terms (OTLP JSON by hand, protobuf with the protocol's generated types), never with the
//! relay's code.

use std::collections::HashMap;
use std::io::Read as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use prost::Message as _;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::helpers::{API_TOKEN, APP_SECRET, CHANNEL_ID, PSID, Reply, TestApp, hub_signature, spawn_app_with, text};

/// What the caller (BonyChat, or Meta) sends: a sampled trace of its own.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn caller_traceparent(flags: &str) -> String {
    format!("00-{CALLER_TRACE}-{CALLER_SPAN}-{flags}")
}

/// SpanKind in OTLP.
const SERVER: i64 = 2;
const CLIENT: i64 = 3;
/// Status code ERROR in OTLP.
const STATUS_ERROR: i64 = 2;

#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    kind: i64,
    attributes: HashMap<String, String>,
    status_code: i64,
    service_name: String,
}

impl Span {
    fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// An export as the collector got it.
#[derive(Debug, Clone)]
struct Export {
    content_type: String,
    headers: HeaderMap,
}

#[derive(Default)]
struct CollectorState {
    spans: Mutex<Vec<Span>>,
    exports: Mutex<Vec<Export>>,
    arrivals: tokio::sync::Notify,
}

/// An OTLP/HTTP collector: `POST /v1/traces`, protobuf or JSON, gzip or not.
struct Collector {
    endpoint: String,
    state: Arc<CollectorState>,
}

impl Collector {
    async fn start() -> Self {
        let state = Arc::new(CollectorState::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route("/v1/traces", axum::routing::post(collect)).with_state(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { endpoint, state }
    }

    fn spans(&self) -> Vec<Span> {
        self.state.spans.lock().unwrap().clone()
    }

    fn exports(&self) -> Vec<Export> {
        self.state.exports.lock().unwrap().clone()
    }

    /// Waits until spans matching `wanted` have arrived, `n` of them.
    async fn wait_for(&self, n: usize, wanted: impl Fn(&Span) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.state.arrivals.notified();
            let spans: Vec<Span> = self.spans().into_iter().filter(|span| wanted(span)).collect();
            if spans.len() >= n {
                return spans;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "the collector got {} matching spans, expected {n}: {:#?}",
                spans.len(),
                self.spans()
            );
        }
    }
}

async fn collect(State(state): State<Arc<CollectorState>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = match headers.get("content-encoding").and_then(|v| v.to_str().ok()) {
        Some("gzip") => {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut plain).expect("a gzip body");
            plain
        }
        _ => body.to_vec(),
    };
    let spans = match content_type.as_str() {
        "application/json" => spans_of_json(&serde_json::from_slice(&body).expect("an OTLP JSON body")),
        "application/x-protobuf" => spans_of_protobuf(&body),
        other => panic!("an export with content type {other:?}"),
    };
    state.exports.lock().unwrap().push(Export { content_type, headers });
    state.spans.lock().unwrap().extend(spans);
    state.arrivals.notify_waiters();
    StatusCode::OK
}

/// OTLP/JSON (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding): ids are hex,
/// enums integers, 64-bit integers strings.
fn spans_of_json(export: &Value) -> Vec<Span> {
    let mut spans = Vec::new();
    for resource in export["resourceSpans"].as_array().expect("resourceSpans") {
        let service_name =
            json_attributes(&resource["resource"]["attributes"]).remove("service.name").unwrap_or_default();
        for scope in resource["scopeSpans"].as_array().expect("scopeSpans") {
            for span in scope["spans"].as_array().expect("spans") {
                let string = |key: &str| span[key].as_str().unwrap_or("").to_owned();
                spans.push(Span {
                    trace_id: string("traceId"),
                    span_id: string("spanId"),
                    parent_span_id: string("parentSpanId"),
                    name: string("name"),
                    kind: span["kind"].as_i64().expect("kind"),
                    attributes: json_attributes(&span["attributes"]),
                    status_code: span["status"]["code"].as_i64().unwrap_or(0),
                    service_name: service_name.clone(),
                });
            }
        }
    }
    spans
}

fn json_attributes(attributes: &Value) -> HashMap<String, String> {
    let Some(attributes) = attributes.as_array() else { return HashMap::new() };
    attributes
        .iter()
        .map(|attribute| {
            let value = &attribute["value"];
            let shown = match (value.get("stringValue"), value.get("intValue"), value.get("boolValue")) {
                (Some(text), _, _) => text.as_str().unwrap().to_owned(),
                (_, Some(int), _) => int.as_str().map_or_else(|| int.to_string(), str::to_owned),
                (_, _, Some(flag)) => flag.to_string(),
                _ => value.to_string(),
            };
            (attribute["key"].as_str().unwrap().to_owned(), shown)
        })
        .collect()
}

fn spans_of_protobuf(body: &[u8]) -> Vec<Span> {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    fn attributes(attributes: &[KeyValue]) -> HashMap<String, String> {
        attributes
            .iter()
            .map(|kv| {
                let shown = match kv.value.as_ref().and_then(|AnyValue { value }| value.as_ref()) {
                    Some(any_value::Value::StringValue(text)) => text.clone(),
                    Some(any_value::Value::IntValue(int)) => int.to_string(),
                    Some(any_value::Value::BoolValue(flag)) => flag.to_string(),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), shown)
            })
            .collect()
    }
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let request = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
    let mut spans = Vec::new();
    for resource in request.resource_spans {
        let service_name = resource
            .resource
            .map(|resource| attributes(&resource.attributes).remove("service.name").unwrap_or_default())
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(Span {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: i64::from(span.kind),
                    attributes: attributes(&span.attributes),
                    status_code: span.status.map_or(0, |status| i64::from(status.code)),
                    service_name: service_name.clone(),
                });
            }
        }
    }
    spans
}

/// `00-<trace>-<parent>-<flags>` split into its fields, checked for the W3C shape.
fn fields(traceparent: &str) -> (String, String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    assert_eq!(parts[0], "00", "{traceparent}");
    assert!(parts[1].len() == 32 && parts[2].len() == 16 && parts[3].len() == 2, "{traceparent}");
    let lower_hex = |part: &str| part.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    assert!(parts.iter().all(|part| lower_hex(part)), "{traceparent}");
    (parts[1].to_owned(), parts[2].to_owned(), parts[3].to_owned())
}

/// The relay exporting to `collector` with a short batch delay, and `extra` variables.
async fn traced_app(collector: &Collector, extra: &[(&str, &str)]) -> TestApp {
    let mut vars =
        vec![("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "50")];
    vars.extend_from_slice(extra);
    spawn_app_with(&vars).await
}

async fn send_traced(app: &TestApp, traceparent: Option<&str>, contact: &str) -> StatusCode {
    send_with_trace(app, traceparent, None, contact).await
}

/// `/message` with the W3C headers given.
async fn send_with_trace(
    app: &TestApp,
    traceparent: Option<&str>,
    tracestate: Option<&str>,
    contact: &str,
) -> StatusCode {
    let body = json!({"channelId": CHANNEL_ID, "contactId": contact, "message": text("hello")});
    let mut request = app.http.post(app.url("/message")).bearer_auth(API_TOKEN).json(&body);
    for (name, value) in [("traceparent", traceparent), ("tracestate", tracestate)] {
        if let Some(value) = value {
            request = request.header(name, value);
        }
    }
    request.send().await.expect("relay answers").status()
}

async fn post_webhook_traced(app: &TestApp, traceparent: Option<&str>, mid: &str) -> StatusCode {
    let body = crate::helpers::webhook_message(PSID, mid, "hi there");
    let mut request = app
        .http
        .post(app.url("/webhooks/messenger"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", hub_signature(APP_SECRET, &body))
        .body(body);
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    request.send().await.expect("relay answers").status()
}

#[tokio::test]
async fn a_message_is_one_trace_from_bonychat_through_the_relay_to_joinchat() {
    let collector = Collector::start().await;
    let app = traced_app(
        &collector,
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_SERVICE_NAME", "relay-under-test"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=collector-key"),
        ],
    )
    .await;

    let traceparent = caller_traceparent("01");
    let traced = send_with_trace(&app, Some(&traceparent), Some("bony=t61rcWkgMzE"), PSID);
    assert_eq!(traced.await, StatusCode::OK);

    let sent = app.joinchat.wait_for(1).await;
    assert_eq!(sent[0].tracestate.as_deref(), Some("bony=t61rcWkgMzE"), "the caller's tracestate goes on");
    let (trace, parent, flags) = fields(sent[0].traceparent.as_deref().expect("JoinChat got a traceparent"));
    assert_eq!((trace.as_str(), flags.as_str()), (CALLER_TRACE, "01"), "the caller's trace, sampled");
    assert_ne!(parent, CALLER_SPAN, "the relay's own span is JoinChat's parent");

    let spans = collector.wait_for(2, |span| span.trace_id == CALLER_TRACE).await;
    let server = spans.iter().find(|span| span.kind == SERVER).expect("a server span");
    assert_eq!(server.name, "POST /message");
    assert_eq!(server.parent_span_id, CALLER_SPAN, "child of BonyChat's span");
    assert_eq!(server.attribute("http.response.status_code"), Some("200"));
    assert_eq!(server.attribute("relay.channel"), Some("default"));
    assert!(server.attribute("relay.request_id").is_some_and(|id| id.len() == 36), "{server:?}");
    let attempt = spans.iter().find(|span| span.kind == CLIENT).expect("an attempt span");
    assert_eq!(attempt.span_id, parent, "JoinChat's parent is the attempt");
    assert_eq!(attempt.parent_span_id, server.span_id, "the attempt is a child of the request that stored it");
    assert_eq!(attempt.attribute("relay.direction"), Some("outbound"));
    assert_eq!(attempt.attribute("relay.channel"), Some("default"));
    assert_eq!(attempt.attribute("relay.attempt"), Some("1"));
    assert_eq!(attempt.attribute("relay.outcome"), Some("sent"));
    assert!(spans.iter().all(|span| span.service_name == "relay-under-test"), "{spans:#?}");

    let exports = collector.exports();
    assert!(exports.iter().all(|export| export.content_type == "application/json"), "{exports:?}");
    assert!(
        exports.iter().all(|export| export.headers.get("x-api-key").is_some_and(|v| v == "collector-key")),
        "OTEL_EXPORTER_OTLP_HEADERS go with every export"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_webhook_is_one_trace_from_messenger_through_the_relay_to_bonychat() {
    let collector = Collector::start().await;
    // The default protocol (protobuf), compressed.
    let app = traced_app(&collector, &[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]).await;

    assert_eq!(post_webhook_traced(&app, Some(&caller_traceparent("01")), "mid.traced").await, StatusCode::OK);

    let posted = app.bonychat.wait_for(1).await;
    let (trace, parent, _) = fields(posted[0].traceparent.as_deref().expect("BonyChat got a traceparent"));
    assert_eq!(trace, CALLER_TRACE);
    let spans = collector.wait_for(2, |span| span.trace_id == CALLER_TRACE).await;
    let server = spans.iter().find(|span| span.kind == SERVER).expect("a server span");
    assert_eq!(server.name, "POST /webhooks/messenger");
    assert_eq!(server.parent_span_id, CALLER_SPAN);
    let attempt = spans.iter().find(|span| span.kind == CLIENT).expect("an attempt span");
    assert_eq!((attempt.span_id.as_str(), attempt.parent_span_id.as_str()), (parent.as_str(), server.span_id.as_str()));
    assert_eq!(attempt.attribute("relay.direction"), Some("inbound"));
    assert_eq!(attempt.attribute("relay.outcome"), Some("sent"));
    assert!(collector.exports().iter().all(|export| export.content_type == "application/x-protobuf"));
    assert!(
        collector.exports().iter().all(|export| export.headers.get("content-encoding").is_some_and(|v| v == "gzip"))
    );
    app.stop().await;
}

/// Each attempt is a span of the message's trace, the failed one with JoinChat's status, and
/// the trace survives a restart between them: it is kept with the job, not in memory.
#[tokio::test]
async fn every_attempt_is_a_span_of_the_message_s_trace_even_after_a_restart() {
    attempts_are_spans_of_the_message_s_trace_across_a_restart(&[]).await;
}

/// The same on PostgreSQL, where the replica that retries may be another one.
#[tokio::test]
#[cfg_attr(
    not(postgres_tests),
    ignore = "no PostgreSQL: install postgresql (see README) or set RELAY_TEST_POSTGRES_URL"
)]
async fn every_attempt_is_a_span_of_the_message_s_trace_on_postgres_too() {
    let url = crate::postgres::fresh_database().await;
    attempts_are_spans_of_the_message_s_trace_across_a_restart(&[("RELAY_DATABASE_URL", &url)]).await;
}

async fn attempts_are_spans_of_the_message_s_trace_across_a_restart(store: &[(&str, &str)]) {
    let collector = Collector::start().await;
    let mut vars = vec![("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"), ("RELAY_RETRY_JOINCHAT", "1s")];
    vars.extend_from_slice(store);
    let app = traced_app(&collector, &vars).await;
    app.joinchat.script([Reply::status(503, r#"{"success":false,"errors":{"msg":"busy"}}"#)]);

    assert_eq!(send_traced(&app, Some(&caller_traceparent("01")), PSID).await, StatusCode::OK);
    app.joinchat.wait_for(1).await;
    let app = app.restart().await;

    let sent = app.joinchat.wait_for(2).await;
    let spans = collector.wait_for(3, |span| span.trace_id == CALLER_TRACE).await;
    let server = spans.iter().find(|span| span.kind == SERVER).expect("a server span");
    let mut attempts: Vec<&Span> = spans.iter().filter(|span| span.kind == CLIENT).collect();
    attempts.sort_by_key(|span| span.attribute("relay.attempt").map(str::to_owned));
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!((first.attribute("relay.attempt"), first.attribute("relay.outcome")), (Some("1"), Some("retry")));
    assert_eq!(first.attribute("http.response.status_code"), Some("503"));
    assert_eq!(first.status_code, STATUS_ERROR);
    assert_eq!((second.attribute("relay.attempt"), second.attribute("relay.outcome")), (Some("2"), Some("sent")));
    assert!(attempts.iter().all(|attempt| attempt.parent_span_id == server.span_id), "{attempts:#?}");
    for (received, attempt) in sent.iter().zip([first, second]) {
        let (trace, parent, _) = fields(received.traceparent.as_deref().unwrap());
        assert_eq!((trace.as_str(), parent.as_str()), (CALLER_TRACE, attempt.span_id.as_str()));
    }
    app.stop().await;
}

/// A request without a trace starts one; one with a `traceparent` the specification says to
/// ignore does too, and never passes its garbage on.
#[tokio::test]
async fn a_request_without_a_valid_traceparent_starts_a_trace_of_its_own() {
    let collector = Collector::start().await;
    let app = traced_app(&collector, &[]).await;

    assert_eq!(send_traced(&app, None, "2000000000000001").await, StatusCode::OK);
    let garbage = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
    assert_eq!(send_traced(&app, Some(garbage), "2000000000000002").await, StatusCode::OK);

    let sent = app.joinchat.wait_for(2).await;
    for received in &sent {
        let (trace, _, flags) = fields(received.traceparent.as_deref().expect("a traceparent"));
        assert_ne!(trace.to_ascii_uppercase(), CALLER_TRACE.to_ascii_uppercase());
        assert_eq!(flags, "01", "sampled by default");
        let spans = collector.wait_for(2, |span| span.trace_id == trace).await;
        let server = spans.iter().find(|span| span.kind == SERVER).expect("a server span");
        assert_eq!(server.parent_span_id, "", "a root span");
    }
    app.stop().await;
}

/// The caller decided not to sample: the relay follows (nothing exported) but still passes
/// the trace on, so the decision holds downstream too.
#[tokio::test]
async fn a_caller_s_decision_not_to_sample_is_followed_and_passed_on() {
    let collector = Collector::start().await;
    let app = traced_app(&collector, &[]).await;

    assert_eq!(send_traced(&app, Some(&caller_traceparent("00")), PSID).await, StatusCode::OK);
    // A sampled one after it: once its spans are in, the unsampled one's would be too.
    assert_eq!(send_traced(&app, None, "2000000000000003").await, StatusCode::OK);

    let sent = app.joinchat.wait_for(2).await;
    let (trace, _, flags) = fields(sent[0].traceparent.as_deref().unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (CALLER_TRACE, "00"));
    let (other, _, _) = fields(sent[1].traceparent.as_deref().unwrap());
    collector.wait_for(2, |span| span.trace_id == other).await;
    app.stop().await;
    assert!(collector.spans().iter().all(|span| span.trace_id != CALLER_TRACE), "{:#?}", collector.spans());
}

/// With traces off, a caller's `traceparent` still reaches the upstream as it came: a tracing
/// BonyChat and a tracing upstream see one trace through a relay that does not trace.
#[tokio::test]
async fn with_traces_off_the_caller_s_traceparent_is_passed_on_as_it_came() {
    let app = spawn_app_with(&[]).await;
    let traceparent = caller_traceparent("01");

    let traced = send_with_trace(&app, Some(&traceparent), Some("bony=t61rcWkgMzE,other=1"), PSID);
    assert_eq!(traced.await, StatusCode::OK);
    assert_eq!(send_traced(&app, None, "2000000000000004").await, StatusCode::OK);
    assert_eq!(post_webhook_traced(&app, Some(&traceparent), "mid.off").await, StatusCode::OK);

    let sent = app.joinchat.wait_for(2).await;
    assert_eq!(sent[0].traceparent.as_deref(), Some(traceparent.as_str()));
    assert_eq!(sent[0].tracestate.as_deref(), Some("bony=t61rcWkgMzE,other=1"));
    assert_eq!((&sent[1].traceparent, &sent[1].tracestate), (&None, &None), "none made up");
    let posted = app.bonychat.wait_for(1).await;
    assert_eq!(posted[0].traceparent.as_deref(), Some(traceparent.as_str()));
    app.stop().await;
}

/// What is still queued when the relay stops is exported before it exits: the batch delay here
/// is far longer than the test, so only the shutdown's flush can deliver the spans.
#[tokio::test]
async fn the_spans_queued_at_shutdown_are_exported_before_the_relay_stops() {
    let collector = Collector::start().await;
    let app = spawn_app_with(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
    ])
    .await;
    assert_eq!(send_traced(&app, Some(&caller_traceparent("01")), PSID).await, StatusCode::OK);
    app.joinchat.wait_for(1).await;
    assert!(collector.spans().is_empty(), "exported before the batch delay: the test shows nothing");

    app.stop().await;

    let spans: Vec<Span> = collector.spans().into_iter().filter(|span| span.trace_id == CALLER_TRACE).collect();
    assert_eq!(spans.len(), 2, "the request's span and the attempt's: {spans:#?}");
}

/// A collector that never answers, or is not there: messages go through as if traces were off,
/// and the spans that could not go are counted.
#[tokio::test]
async fn a_collector_that_hangs_or_is_away_costs_nothing_but_counted_dropped_spans() {
    let hanging_addr = crate::helpers::hanging_server().await;
    // Bound and closed again: connections are refused.
    let away: SocketAddr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();

    for (collector, contact_base) in [(hanging_addr, 3_000_000_000_000_000_u64), (away, 4_000_000_000_000_000)] {
        let endpoint = format!("http://{collector}");
        let app = spawn_app_with(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            // A blocking exporter would hold each request this long.
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10000"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "4"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2"),
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
        ])
        .await;
        let dropped_before = dropped_spans(&app).await;

        let sends = async {
            for i in 0..20 {
                let status = send_traced(&app, Some(&caller_traceparent("01")), &(contact_base + i).to_string()).await;
                assert_eq!(status, StatusCode::OK);
            }
        };
        tokio::time::timeout(Duration::from_secs(15), sends)
            .await
            .expect("20 messages went through in well under one export timeout");
        assert_eq!(app.joinchat.wait_for(20).await.len(), 20);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while dropped_spans(&app).await <= dropped_before {
            assert!(tokio::time::Instant::now() < deadline, "no dropped span counted with the collector at {endpoint}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.stop().await;
    }
}

/// `bonychat_relay_trace_spans_dropped_total`, all reasons: the metrics are process-wide, so
/// tests compare it with itself.
async fn dropped_spans(app: &TestApp) -> f64 {
    let page = app.http.get(format!("http://{}/metrics", app.metrics_addr)).send().await.unwrap().text().await.unwrap();
    page.lines()
        .filter(|line| line.starts_with("bonychat_relay_trace_spans_dropped_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The compiled binary, configured from its environment as in production: it exports, its
/// attempt lines carry the trace id (from a warning to its trace in one step), it says where
/// it exports, and the collector's API key never reaches the logs.
#[tokio::test]
async fn the_binary_exports_and_its_attempt_lines_carry_the_trace_id() {
    use crate::binary::{RelayProcess, json_logs};
    use crate::first_day::lines_with;
    use crate::helpers::{JOINCHAT_SECRET, StandIn, test_vars};

    let collector = Collector::start().await;
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    let data = tempfile::tempdir().unwrap();
    let mut vars = test_vars(&joinchat.url, data.path());
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20collector-s3cret"),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ] {
        vars.push((name.to_owned(), value.to_owned()));
    }
    json_logs(&mut vars);
    let relay = RelayProcess::start(&vars, &[]).await;

    let body = json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": text("hello")});
    let answer = crate::helpers::http_client()
        .post(relay.url("/message"))
        .bearer_auth(API_TOKEN)
        .header("traceparent", caller_traceparent("01"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    collector.wait_for(2, |span| span.trace_id == CALLER_TRACE).await;
    let (_, output) = relay.terminate().await;

    let attempts = lines_with(&output, "job attempt");
    assert_eq!(attempts.len(), 1, "{output:?}");
    assert_eq!(attempts[0]["trace_id"], CALLER_TRACE);
    let exporting = lines_with(&output, "exporting traces over OTLP/HTTP");
    assert_eq!(exporting[0]["collector"], format!("{}/v1/traces", collector.endpoint), "{output:?}");
    assert!(!output.join("\n").contains("collector-s3cret"), "{output:?}");
    assert!(collector.exports().iter().all(|export| export.headers["authorization"] == "Bearer collector-s3cret"));
}

/// What the relay cannot honour stops the start, naming the variable and what to set instead,
/// rather than starting with traces silently going nowhere.
#[tokio::test]
async fn an_otlp_setting_the_relay_cannot_honour_stops_the_start() {
    use crate::binary::run_binary;
    use crate::helpers::test_vars;

    let data = tempfile::tempdir().unwrap();
    for (name, value, expected) in [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "OTEL_EXPORTER_OTLP_PROTOCOL: grpc is not supported"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318", "OTEL_EXPORTER_OTLP_ENDPOINT:"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "OTEL_TRACES_SAMPLER:"),
    ] {
        let mut vars = test_vars("http://127.0.0.1:9/api/send_message", data.path());
        vars.push(("OTEL_EXPORTER_OTLP_ENDPOINT".into(), "http://127.0.0.1:4318".into()));
        vars.retain(|(k, _)| k != name);
        vars.push((name.to_owned(), value.to_owned()));
        let (code, _, stderr) = run_binary(&vars, &[]).await;
        assert_eq!(code, Some(2), "{name}={value}: {stderr}");
        assert!(stderr.contains(expected), "{name}={value}: {stderr}");
    }
}

/// The console's page of a job names the trace its attempts are spans of: an operator looking
/// at a dead letter finds it in the trace viewer.
#[tokio::test]
async fn a_job_s_console_page_names_its_trace() {
    use crate::console::{ADMIN_TOKEN, no_redirects, signed_in};
    let collector = Collector::start().await;
    let app = traced_app(&collector, &[("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)]).await;
    assert_eq!(send_traced(&app, Some(&caller_traceparent("01")), PSID).await, StatusCode::OK);
    let id = app.jobs(bonychat_relay::store::JobState::Delivered).await[0].id;

    let (http, base) = (no_redirects(), format!("http://{}", app.addr));
    let session = signed_in(&http, &base).await;
    let page = http.get(format!("{base}/admin/job/{id}")).header("cookie", &session).send().await.unwrap();
    let page = page.text().await.unwrap();
    assert!(page.contains(&format!("<dt>Trace</dt><dd><code>{CALLER_TRACE}</code></dd>")), "{page}");
    app.stop().await;
}
