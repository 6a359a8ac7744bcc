//! Traces (SPEC §6): a message followed from BonyChat through the relay to Messenger, across
//! processes and across the store.
//!
//! - A W3C `traceparent` received on `/message` or a webhook starts the request's server span
//!   (a new trace without one); the span's context is kept with each job the request stores.
//! - Every attempt at a job is a span, child of that context whichever replica makes it and
//!   however long after, with direction, channel, attempt and outcome; its `traceparent` goes
//!   on each request the attempt sends to JoinChat or BonyChat.
//! - With traces off (no OTLP endpoint), a caller's valid `traceparent` is still kept and passed
//!   on as it came, so a tracing BonyChat and a tracing upstream still see one trace.
//! - A `tracestate` that comes with a valid `traceparent` is kept and passed on with it, on or
//!   off, as the specification asks of every participant.
//!
//! Exporting never waits on the request path: an ended span goes into a bounded queue with a
//! `try_send` and one task exports batches from it. A collector that is slow or away fills the
//! queue; what does not fit is dropped and counted (`bonychat_relay_trace_spans_dropped_total`),
//! and the requests go on at their speed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::shown_url;
use crate::config::traces::{OtlpConfig, OtlpProtocol, RootSampler, Sampler};
use crate::store::{Direction, Job};
use crate::telemetry::ServedChannel;

/// The header, as W3C Trace Context names it.
pub const TRACEPARENT: &str = "traceparent";

/// The relay's tracing: exporting spans, or passing `traceparent` through when off. Cheap to
/// clone; every clone exports through the same queue.
#[derive(Clone, Default)]
pub struct Traces {
    exporting: Option<Arc<Exporting>>,
}

struct Exporting {
    tracer: SdkTracer,
    /// Holds the processor that queues ended spans.
    _provider: SdkTracerProvider,
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Traces {
    /// No export: `traceparent` is passed through as received.
    pub fn off() -> Self {
        Self::default()
    }

    /// Starts exporting per `config` (from a Tokio runtime: the export task runs on it); off
    /// without one.
    pub fn start(config: Option<&OtlpConfig>) -> Result<Self, String> {
        let Some(config) = config else { return Ok(Self::off()) };
        let mut exporter = exporter(config)?;
        let resource = Resource::builder_empty()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_attributes(config.resource.iter().map(|(key, value)| KeyValue::new(key.clone(), value.clone())))
            .build();
        exporter.set_resource(&resource);
        let (spans, queued) = mpsc::channel(config.max_queue);
        let provider = SdkTracerProvider::builder()
            .with_resource(resource)
            .with_sampler(sampler(config.sampler))
            .with_span_processor(Queue { spans })
            .build();
        let stop = CancellationToken::new();
        let batches = Batches {
            max: config.max_batch,
            delay: config.schedule_delay,
            timeout: config.export_timeout,
            collector: shown_url(&config.url),
        };
        let task = tokio::spawn(export_forever(exporter, queued, batches, stop.clone()));
        tracing::info!(
            collector = %shown_url(&config.url),
            protocol = config.protocol.as_str(),
            "exporting traces over OTLP/HTTP"
        );
        Ok(Self {
            exporting: Some(Arc::new(Exporting {
                tracer: provider.tracer("bonychat-relay"),
                _provider: provider,
                stop,
                task: Mutex::new(Some(task)),
            })),
        })
    }

    /// The server span of a request that stores work (named `name()`, asked only when traces
    /// are on), child of the caller's `traceparent`.
    pub fn received(&self, name: impl FnOnce() -> String, headers: &HeaderMap) -> Received {
        // A `tracestate` is read only along a valid `traceparent`, as the specification says.
        let caller = caller_traceparent(headers).map(|parent| (parent, caller_tracestate(headers)));
        let Some(exporting) = &self.exporting else {
            return Received { span: None, keep: caller.map(|(parent, state)| kept_context(&parent, &state)) };
        };
        let span = exporting
            .tracer
            .span_builder(name())
            .with_kind(SpanKind::Server)
            .start_with_context(&exporting.tracer, &parent_context(caller));
        let context = span.span_context();
        let keep = kept_context(&TraceParent::of(context), context.trace_state());
        Received { span: Some(span), keep: Some(keep) }
    }

    /// The span of one attempt at `job`, child of the context kept with it.
    pub fn attempt(&self, job: &Job) -> AttemptSpan {
        let kept = job.trace_context.as_deref().and_then(read_kept_context);
        let Some(exporting) = &self.exporting else {
            let outgoing = kept.map_or_else(TraceHeaders::default, |(parent, state)| TraceHeaders::of(&parent, &state));
            return AttemptSpan { span: None, outgoing };
        };
        let (name, upstream) = match job.direction {
            Direction::Outbound => ("send to JoinChat", "joinchat"),
            Direction::Inbound => ("post to BonyChat", "bonychat"),
        };
        let span = exporting
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new("relay.direction", job.direction.as_str()),
                KeyValue::new("relay.channel", job.channel.clone()),
                KeyValue::new("relay.attempt", i64::from(job.attempts) + 1),
                KeyValue::new("relay.job_id", job.id),
                KeyValue::new("relay.upstream", upstream),
            ])
            .start_with_context(&exporting.tracer, &parent_context(kept));
        let outgoing = TraceHeaders::of(&TraceParent::of(span.span_context()), span.span_context().trace_state());
        AttemptSpan { span: Some(span), outgoing }
    }

    /// Exports what is queued, within `deadline`: at shutdown, so that the last spans are not lost.
    pub async fn flush(&self, deadline: Duration) {
        let Some(exporting) = &self.exporting else { return };
        exporting.stop.cancel();
        let task = exporting.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(task) = task
            && tokio::time::timeout(deadline, task).await.is_err()
        {
            tracing::warn!("the last spans could not be exported in time; they are dropped");
        }
    }
}

/// The server span of a request that stores work, and the context its jobs keep.
pub struct Received {
    span: Option<opentelemetry_sdk::trace::Span>,
    keep: Option<String>,
}

impl Received {
    /// What the request's jobs keep ([`Job::trace_context`]): this span's context, or with
    /// traces off the caller's.
    pub fn job_context(&self) -> Option<String> {
        self.keep.clone()
    }

    fn end(self, route: Option<&MatchedPath>, status: u16, request: Option<RequestFacts>) {
        let (Some(mut span), Some(request)) = (self.span, request) else { return };
        if let Some(route) = route {
            span.set_attribute(KeyValue::new("http.route", route.as_str().to_owned()));
        }
        if let Some(channel) = request.served.as_ref().and_then(ServedChannel::get) {
            span.set_attribute(KeyValue::new("relay.channel", channel.to_owned()));
        }
        if let Some(id) = request.id.as_ref().and_then(|id| id.to_str().ok()) {
            span.set_attribute(KeyValue::new("relay.request_id", id.to_owned()));
        }
        span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        if status >= 500 {
            span.set_status(Status::error(format!("answered {status}")));
        }
        span.end();
    }
}

/// What the request's span tells besides its route and status: the channel it served (set by
/// its handler), and the request id its log line has.
struct RequestFacts {
    served: Option<ServedChannel>,
    id: Option<HeaderValue>,
}

/// The trace context a request hands to the jobs it stores (a request extension set by
/// [`receive`]).
#[derive(Clone, Debug, Default)]
pub struct JobTrace(pub Option<String>);

/// Middleware of the routes that store work: the request's server span, and the context its
/// jobs keep ([`JobTrace`]).
pub async fn receive(State(traces): State<Traces>, mut request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    let name = || format!("{} {}", request.method(), route.as_ref().map_or("unmatched", MatchedPath::as_str));
    let received = traces.received(name, request.headers());
    request.extensions_mut().insert(JobTrace(received.job_context()));
    // Read only for a span: with traces off a request pays for nothing of this.
    let facts = received.span.is_some().then(|| RequestFacts {
        served: request.extensions().get::<ServedChannel>().cloned(),
        id: request.headers().get("x-request-id").cloned(),
    });
    let response = next.run(request).await;
    received.end(route.as_ref(), response.status().as_u16(), facts);
    response
}

/// One attempt's span, and the trace headers its requests carry.
pub struct AttemptSpan {
    span: Option<opentelemetry_sdk::trace::Span>,
    outgoing: TraceHeaders,
}

/// The W3C headers a request to an upstream carries: `traceparent`, and `tracestate` when the
/// trace has one.
#[derive(Clone, Debug, Default)]
pub struct TraceHeaders {
    pub traceparent: Option<HeaderValue>,
    pub tracestate: Option<HeaderValue>,
}

impl TraceHeaders {
    fn of(parent: &TraceParent, state: &TraceState) -> Self {
        let state = state.header();
        Self {
            traceparent: HeaderValue::from_str(&parent.to_string()).ok(),
            tracestate: (!state.is_empty()).then(|| HeaderValue::from_str(&state).ok()).flatten(),
        }
    }
}

/// What the attempt running in this task is: its span, and the header its requests carry.
struct AttemptScope {
    outgoing: TraceHeaders,
    span: Mutex<Option<(opentelemetry_sdk::trace::Span, bool)>>,
}

tokio::task_local! {
    static ATTEMPT: AttemptScope;
}

impl AttemptSpan {
    /// Runs `attempt` as this span: its requests carry the span's trace headers
    /// ([`outgoing_trace_headers`]) and its outcome is recorded by [`attempt_ended`]; the span
    /// ends with it (as `interrupted` when it recorded none: a lost lease, a shutdown).
    pub async fn run<F: Future>(self, attempt: F) -> F::Output {
        let scope = AttemptScope { outgoing: self.outgoing, span: Mutex::new(self.span.map(|span| (span, false))) };
        ATTEMPT
            .scope(scope, async {
                let output = attempt.await;
                let _ = ATTEMPT.try_with(|scope| {
                    if let Some((mut span, ended)) = lock(&scope.span).take() {
                        if !ended {
                            span.set_attribute(KeyValue::new("relay.outcome", "interrupted"));
                        }
                        span.end();
                    }
                });
                output
            })
            .await
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The trace headers a request sent from the current attempt carries (none outside one).
pub fn outgoing_trace_headers() -> TraceHeaders {
    ATTEMPT.try_with(|scope| scope.outgoing.clone()).unwrap_or_default()
}

/// The trace id of the current attempt, for its log lines: an operator goes from a failed
/// attempt's warning to its trace.
pub fn current_trace_id() -> Option<String> {
    let traceparent = outgoing_trace_headers().traceparent?;
    traceparent.to_str().ok().and_then(|value| value.get(3..35)).map(str::to_owned)
}

/// Records how the current attempt ended: `outcome` as the metrics name it, the upstream's
/// HTTP status when it answered, and the reason when it failed.
pub fn attempt_ended(outcome: &'static str, status: Option<u16>, error: Option<&str>) {
    let _ = ATTEMPT.try_with(|scope| {
        let mut span = lock(&scope.span);
        let Some((span, ended)) = span.as_mut() else { return };
        *ended = true;
        span.set_attribute(KeyValue::new("relay.outcome", outcome));
        if let Some(status) = status {
            span.set_attribute(KeyValue::new("http.response.status_code", i64::from(status)));
        }
        if let Some(error) = error {
            span.set_status(Status::error(error.to_owned()));
        }
    });
}

/// A W3C `traceparent` (<https://www.w3.org/TR/trace-context/#traceparent-header>), as kept and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: TraceFlags,
}

impl TraceParent {
    fn of(context: &SpanContext) -> Self {
        Self { trace_id: context.trace_id(), span_id: context.span_id(), flags: context.trace_flags() }
    }

    /// Parses a `traceparent` value; `None` for anything the specification says to ignore:
    /// a bad length or character, upper-case hex, version `ff`, an all-zero id, or a version
    /// `00` value with more after it. A later version's extra fields are ignored, as it asks.
    pub fn parse(raw: &str) -> Option<Self> {
        let bytes = raw.as_bytes();
        let is_hex = |part: &[u8]| part.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b));
        if bytes.len() < 55 || !bytes.is_ascii() {
            return None;
        }
        let (version, trace_id, span_id, flags) = (&bytes[0..2], &bytes[3..35], &bytes[36..52], &bytes[53..55]);
        let dashes = [bytes[2], bytes[35], bytes[52]] == [b'-'; 3];
        if !dashes || ![version, trace_id, span_id, flags].into_iter().all(is_hex) || version == b"ff" {
            return None;
        }
        match (version, bytes.get(55)) {
            (_, None) => {}
            (b"00", Some(_)) => return None,
            (_, Some(b'-')) => {}
            (_, Some(_)) => return None,
        }
        let trace_id = TraceId::from_hex(&raw[3..35]).ok().filter(|id| *id != TraceId::INVALID)?;
        let span_id = SpanId::from_hex(&raw[36..52]).ok().filter(|id| *id != SpanId::INVALID)?;
        let flags = u8::from_str_radix(&raw[53..55], 16).ok()?;
        // Of the flags, only `sampled` is defined; the rest are not passed on.
        Some(Self { trace_id, span_id, flags: TraceFlags::new(flags) & TraceFlags::SAMPLED })
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags.to_u8())
    }
}

/// The caller's `traceparent`: one valid value, or nothing (a request carrying two is as
/// good as none: which one is the caller's cannot be told).
fn caller_traceparent(headers: &HeaderMap) -> Option<TraceParent> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let (Some(value), None) = (values.next(), values.next()) else { return None };
    TraceParent::parse(value.to_str().ok()?.trim_matches([' ', '\t']))
}

/// The caller's `tracestate`: its headers joined, as the specification reads several, and kept
/// only when it parses as a list of `key=value` members. At most 512 characters are passed on,
/// whole members from the start, as it allows.
fn caller_tracestate(headers: &HeaderMap) -> TraceState {
    let mut members = Vec::new();
    for value in headers.get_all(TRACESTATE) {
        let Ok(value) = value.to_str() else { return TraceState::default() };
        members.extend(value.split(',').map(|member| member.trim_matches([' ', '\t'])).filter(|m| !m.is_empty()));
    }
    let mut kept = String::new();
    for member in members.into_iter().take(MAX_TRACESTATE_MEMBERS) {
        if kept.len() + member.len() + 1 > MAX_TRACESTATE_LEN {
            break;
        }
        if !kept.is_empty() {
            kept.push(',');
        }
        kept.push_str(member);
    }
    kept.parse().unwrap_or_default()
}

pub const TRACESTATE: &str = "tracestate";
const MAX_TRACESTATE_MEMBERS: usize = 32;
const MAX_TRACESTATE_LEN: usize = 512;

/// How a job keeps its trace context: the `traceparent`, then a line break and the
/// `tracestate` when there is one (a line break never occurs in a header value).
fn kept_context(parent: &TraceParent, state: &TraceState) -> String {
    let state = state.header();
    if state.is_empty() { parent.to_string() } else { format!("{parent}\n{state}") }
}

/// A context kept by [`kept_context`], as the parent of an attempt.
fn read_kept_context(kept: &str) -> Option<(TraceParent, TraceState)> {
    let (parent, state) = kept.split_once('\n').map_or((kept, None), |(parent, state)| (parent, Some(state)));
    Some((TraceParent::parse(parent)?, state.and_then(|state| state.parse().ok()).unwrap_or_default()))
}

fn parent_context(parent: Option<(TraceParent, TraceState)>) -> Context {
    match parent {
        Some((parent, state)) => Context::new().with_remote_span_context(SpanContext::new(
            parent.trace_id,
            parent.span_id,
            parent.flags,
            true,
            state,
        )),
        None => Context::new(),
    }
}

fn sampler(sampler: Sampler) -> opentelemetry_sdk::trace::Sampler {
    use opentelemetry_sdk::trace::Sampler as Sdk;
    let root = |root: RootSampler| match root {
        RootSampler::AlwaysOn => Sdk::AlwaysOn,
        RootSampler::AlwaysOff => Sdk::AlwaysOff,
        RootSampler::Ratio(ratio) => Sdk::TraceIdRatioBased(ratio),
    };
    match sampler {
        Sampler::AlwaysOn => Sdk::AlwaysOn,
        Sampler::AlwaysOff => Sdk::AlwaysOff,
        Sampler::Ratio(ratio) => Sdk::TraceIdRatioBased(ratio),
        Sampler::ParentBased(inner) => Sdk::ParentBased(Box::new(root(inner))),
    }
}

fn exporter(config: &OtlpConfig) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let http = crate::clients::http::client(config.timeout, config.timeout)
        .map_err(|e| format!("cannot build the HTTP client for the OTLP collector: {e}"))?;
    let headers: HashMap<String, String> =
        config.headers.iter().map(|(name, value)| (name.clone(), value.expose().to_owned())).collect();
    let protocol = match config.protocol {
        OtlpProtocol::Protobuf => opentelemetry_otlp::Protocol::HttpBinary,
        OtlpProtocol::Json => opentelemetry_otlp::Protocol::HttpJson,
    };
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(CollectorClient(http))
        .with_endpoint(config.url.as_str())
        .with_protocol(protocol)
        .with_timeout(config.timeout)
        .with_headers(headers);
    if config.gzip {
        builder = builder.with_compression(opentelemetry_otlp::Compression::Gzip);
    }
    builder.build().map_err(|e| format!("cannot set up the OTLP exporter: {e}"))
}

/// Posts exports with the relay's own HTTP client, on the relay's runtime: the SDK's clients
/// either block a thread or need one of their own.
#[derive(Debug)]
struct CollectorClient(reqwest::Client);

impl HttpClient for CollectorClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: axum::http::Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Result<axum::http::Response<Bytes>, HttpError>> + Send + 'b>>
    where
        'a: 'b,
        Self: 'b,
    {
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let response =
                self.0.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body).send().await?;
            let (status, headers) = (response.status(), response.headers().clone());
            let body = crate::clients::http::read_capped(response).await?;
            let mut answer = axum::http::Response::new(Bytes::from(body));
            *answer.status_mut() = status;
            *answer.headers_mut() = headers;
            Ok(answer)
        })
    }
}

/// Queues ended spans for the export task without ever waiting: a full queue drops the span.
#[derive(Debug)]
struct Queue {
    spans: mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _context: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.spans.try_send(span).is_err() {
            crate::monitoring::spans_dropped("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

struct Batches {
    max: usize,
    /// How long the first span of a batch waits for others.
    delay: Duration,
    timeout: Duration,
    collector: String,
}

/// Exports batches until `stop`, then what is left in the queue.
async fn export_forever(
    exporter: opentelemetry_otlp::SpanExporter,
    mut queued: mpsc::Receiver<SpanData>,
    batches: Batches,
    stop: CancellationToken,
) {
    let mut failing = false;
    let mut batch = Vec::with_capacity(batches.max);
    loop {
        tokio::select! {
            span = queued.recv() => match span {
                Some(span) => batch.push(span),
                None => break,
            },
            () = stop.cancelled() => break,
        }
        let full_by = tokio::time::Instant::now() + batches.delay;
        while batch.len() < batches.max {
            tokio::select! {
                span = queued.recv() => match span {
                    Some(span) => batch.push(span),
                    None => break,
                },
                () = tokio::time::sleep_until(full_by) => break,
                () = stop.cancelled() => break,
            }
        }
        export(&exporter, std::mem::take(&mut batch), &batches, &mut failing).await;
        if stop.is_cancelled() {
            break;
        }
    }
    // At shutdown: what the attempts that just ended queued.
    while let Ok(span) = queued.try_recv() {
        batch.push(span);
        if batch.len() == batches.max {
            export(&exporter, std::mem::take(&mut batch), &batches, &mut failing).await;
        }
    }
    if !batch.is_empty() {
        export(&exporter, batch, &batches, &mut failing).await;
    }
}

/// One export; a failure is logged when exports start failing and when they work again, not
/// for each batch, so that a collector away for an hour does not flood the logs.
async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    batches: &Batches,
    failing: &mut bool,
) {
    let spans = batch.len();
    let error: Cow<'_, str> = match tokio::time::timeout(batches.timeout, exporter.export(batch)).await {
        Ok(Ok(())) => {
            crate::monitoring::spans_exported(spans);
            if std::mem::take(failing) {
                tracing::info!(collector = %batches.collector, "the OTLP collector takes spans again");
            }
            return;
        }
        Ok(Err(e)) => e.to_string().into(),
        Err(_) => format!("no answer within {} ms", batches.timeout.as_millis()).into(),
    };
    crate::monitoring::spans_dropped("export_failed", spans);
    if !std::mem::replace(failing, true) {
        tracing::warn!(
            collector = %batches.collector,
            error = %error,
            "cannot export spans to the OTLP collector; they are dropped (bonychat_relay_trace_spans_dropped_total) \
             until it takes them again; deliveries are not affected"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_kept_as_the_specification_writes_it() {
        let parent = TraceParent::parse(VALID).unwrap();
        assert_eq!(parent.to_string(), VALID);
        assert!(parent.flags.is_sampled());
        // A later version's value is read by its first four fields.
        let later =
            TraceParent::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next").unwrap();
        assert_eq!(later.to_string(), VALID);
        // Flags other than `sampled` are not defined: not passed on.
        assert_eq!(TraceParent::parse(&VALID.replace("-01", "-ff")).unwrap().to_string(), VALID);
    }

    #[test]
    fn what_the_specification_says_to_ignore_is_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn two_traceparent_headers_are_as_good_as_none() {
        let mut headers = HeaderMap::new();
        headers.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(caller_traceparent(&headers).is_some());
        headers.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert_eq!(caller_traceparent(&headers), None);
    }

    #[test]
    fn with_traces_off_the_callers_traceparent_is_passed_through() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, HeaderValue::from_static(VALID));
        let name = || -> String { unreachable!("no span is made with traces off") };
        assert_eq!(Traces::off().received(name, &headers).job_context().as_deref(), Some(VALID));
        assert_eq!(Traces::off().received(name, &HeaderMap::new()).job_context(), None);
        headers.append(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        headers.append(TRACESTATE, HeaderValue::from_static(" rojo=00f067aa0ba902b7 ,"));
        let kept = Traces::off().received(name, &headers).job_context().unwrap();
        assert_eq!(kept, format!("{VALID}\ncongo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
        let (parent, state) = read_kept_context(&kept).unwrap();
        assert_eq!(
            (parent.to_string(), state.header()),
            (VALID.to_owned(), "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into())
        );
    }

    #[test]
    fn a_tracestate_is_kept_only_when_it_parses_and_only_its_first_512_characters() {
        let state = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(TRACESTATE, HeaderValue::from_str(value).unwrap());
            }
            caller_tracestate(&headers).header()
        };
        assert_eq!(state(&[]), "");
        assert_eq!(state(&["not a list member"]), "");
        assert_eq!(state(&["a=1", "b=2,c=3"]), "a=1,b=2,c=3");
        let long: Vec<String> = (0..40).map(|i| format!("k{i:02}={}", "v".repeat(20))).collect();
        let kept = state(&[long.join(",").as_str()]);
        assert!(kept.len() <= 512 && kept.starts_with("k00=") && kept.split(',').count() == 20, "{kept}");
        let many: Vec<String> = (0..40).map(|i| format!("m{i}=1")).collect();
        assert_eq!(state(&[many.join(",").as_str()]), many[..32].join(","), "32 members at most");
        // A tracestate without a valid traceparent is not read at all.
        let mut headers = HeaderMap::new();
        headers.insert(TRACESTATE, HeaderValue::from_static("a=1"));
        let name = || -> String { unreachable!() };
        assert_eq!(Traces::off().received(name, &headers).job_context(), None);
    }
}
