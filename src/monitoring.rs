//! Prometheus metrics: the series the relay records, and the listener that serves them on
//! `RELAY_METRICS_ADDR`, never on the public port. The store, which this module reads, records
//! its commit series itself ([`crate::store::metrics`]); they are described here with the rest.
//!
//! The `metrics` facade takes one global recorder per process, so it is installed once and
//! every [`Application`](crate::startup::Application) in the process shares it: the series are
//! process-wide. A relay is one process in production; tests that start several relays in one
//! process see their sums, and the queue gauges of whichever relay was scraped last.
//!
//! Labels carry only bounded values (route templates, channel names the operator chose,
//! directions, outcomes, states): a contact id or `mId` as a label would make one series per
//! contact and exhaust Prometheus.
//!
//! The listener is the public port's accept loop ([`crate::server`]) with limits of its own: few
//! connections, shared fairly between peers with silent ones closed first, and a short head
//! timeout, so idle sockets cannot keep Prometheus out. A scrape renders every series and
//! reads the store (a probe write and the queue counts), so scrapes within
//! [`SCRAPE_CACHE_PERIOD`] of a render share it: a storm of scrapes costs one render a period,
//! not one each, and cannot take the store's time from `/message`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::domain::bonychat::StatusValue;
use crate::store::metrics::{COMMIT_BATCH, COMMIT_DURATION};
use crate::store::{Direction, QueueCounts, Store};

const HTTP_REQUESTS: &str = "bonychat_relay_http_requests_total";
const HTTP_DURATION: &str = "bonychat_relay_http_request_duration_seconds";
const ATTEMPTS: &str = "bonychat_relay_delivery_attempts_total";
const DELIVERY_LATENCY: &str = "bonychat_relay_delivery_latency_seconds";
const QUEUE_JOBS: &str = "bonychat_relay_queue_jobs";
const QUEUE_OLDEST_AGE: &str = "bonychat_relay_queue_oldest_age_seconds";
const DROPPED: &str = "bonychat_relay_inbound_events_dropped_total";
const RECEIPTS_POSTED: &str = "bonychat_relay_receipts_posted_total";
const CONFIG_RELOADS: &str = "bonychat_relay_config_reloads_total";
const SEND_RATE: &str = "bonychat_relay_joinchat_send_rate";
const THROTTLES: &str = "bonychat_relay_joinchat_throttles_total";
const STORE_WRITABLE: &str = "bonychat_relay_store_writable";
const BUILD_INFO: &str = "bonychat_relay_build_info";
const CONNECTIONS_EVICTED: &str = "bonychat_relay_connections_evicted_total";
const RENDERS: &str = "bonychat_relay_metrics_renders_total";
// Rotation (SPEC §1): which value of each secret is in use.
const SECRET_MATCHES: &str = "bonychat_relay_secret_matches_total";
const SECRET_PREVIOUS_LAST_USED: &str = "bonychat_relay_secret_previous_last_used_timestamp_seconds";
// Traces (SPEC §6): what reached the collector, and what did not.
const SPANS_EXPORTED: &str = "bonychat_relay_trace_spans_exported_total";
const SPANS_DROPPED: &str = "bonychat_relay_trace_spans_dropped_total";

const HTTP_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// From a send within the request to a message retried for a day.
const LATENCY_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 10800.0, 43200.0, 86400.0];
const COMMIT_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Histograms are kept in buffers until a scrape or an upkeep drains them; without scrapes,
/// only upkeep bounds their memory.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);
/// A scrape reads the store; a stalled one must not hold the scrape past Prometheus' timeout.
const SCRAPE_STORE_WAIT: Duration = Duration::from_secs(2);

/// The process-wide recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(install)
}

fn install() -> PrometheusHandle {
    let handle = match builder().and_then(PrometheusBuilder::install_recorder) {
        Ok(handle) => handle,
        Err(e) => {
            // Someone else's recorder is in place (an embedding program): serve empty metrics
            // rather than refuse to start.
            tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics will be empty");
            PrometheusBuilder::new().build_recorder().handle()
        }
    };
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let upkept = handle.clone();
    let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkept.run_upkeep();
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms grow between scrapes");
    }
    handle
}

fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    let full = |name: &str| Matcher::Full(name.to_owned());
    PrometheusBuilder::new()
        .set_buckets_for_metric(full(HTTP_DURATION), HTTP_BUCKETS)?
        .set_buckets_for_metric(full(DELIVERY_LATENCY), LATENCY_BUCKETS)?
        .set_buckets_for_metric(full(COMMIT_DURATION), COMMIT_BUCKETS)?
        .set_buckets_for_metric(full(COMMIT_BATCH), BATCH_BUCKETS)
}

fn describe() {
    describe_counter!(HTTP_REQUESTS, "HTTP requests on the public port, by route template, method and status.");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "Time to answer a request on the public port.");
    describe_counter!(
        ATTEMPTS,
        "Delivery attempts by direction and outcome (sent, retry, rejected, dead; paced, held and throttled are \
         not attempts: the job waits, its retries untouched)."
    );
    describe_gauge!(
        SEND_RATE,
        "The JoinChat sends a second each channel may make now: its configured rate, or less after Meta throttled it."
    );
    describe_counter!(
        THROTTLES,
        "JoinChat answers that said Meta throttled the channel's Page (429 or a rate-limit code)."
    );
    describe_histogram!(DELIVERY_LATENCY, Unit::Seconds, "From storing a job to delivering it.");
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "How long the oldest queued job (ready, delayed or in flight) of a channel and direction has waited; 0 with none."
    );
    describe_gauge!(
        QUEUE_JOBS,
        "Jobs by channel, direction and state (ready, delayed, in_flight, dead), as of the last render (at most about a second old)."
    );
    describe_counter!(
        DROPPED,
        "Inbound webhook content not forwarded, by channel and reason (duplicate, own_echo, ignored, unknown_page)."
    );
    describe_counter!(CONFIG_RELOADS, "SIGHUP reloads of the channels and secrets, by result (applied, refused).");
    describe_counter!(RECEIPTS_POSTED, "Message status receipts BonyChat accepted, by value.");
    describe_histogram!(COMMIT_DURATION, Unit::Seconds, "Duration of one store group commit.");
    describe_histogram!(COMMIT_BATCH, Unit::Count, "Operations committed together in one store commit.");
    describe_gauge!(STORE_WRITABLE, "1 when the store committed a probe write at the last check, else 0.");
    describe_gauge!(BUILD_INFO, "Always 1; the version label says which build runs.");
    describe_counter!(
        CONNECTIONS_EVICTED,
        "Connections closed to keep a full listener (public, metrics) under its cap, by reason (silent, idle, over_fair_share, busy)."
    );
    describe_counter!(
        RENDERS,
        "Renders of /metrics, each with one read of the store; scrapes within a second of one share it."
    );
    describe_counter!(
        SECRET_MATCHES,
        "Uses of each secret by value (current, previous): checks it matched and upstream requests that took it. \
         During a rotation, the previous value can go once its series stops moving."
    );
    describe_gauge!(
        SECRET_PREVIOUS_LAST_USED,
        Unit::Seconds,
        "Unix time a secret's previous value was last needed (matched a check or was taken by an upstream)."
    );
    describe_counter!(SPANS_EXPORTED, "Trace spans the OTLP collector accepted.");
    describe_counter!(
        SPANS_DROPPED,
        "Trace spans never exported, by reason: queue_full (the export queue was full: the collector is slow or \
         away) or export_failed (the collector refused them or did not answer)."
    );
}

/// Scrapes within this of a render get that render. Far below any scrape interval, so one
/// Prometheus never sees a stale page; what it bounds is a storm of scrapes.
pub const SCRAPE_CACHE_PERIOD: Duration = Duration::from_secs(1);

/// `GET /metrics`, for the metrics listener (served with
/// [`ConnectionLimits::metrics`](crate::server::ConnectionLimits::metrics)). The store is held
/// weakly, so a scraper's open connection never keeps a stopped relay's store (and its file
/// lock) alive.
pub fn router(store: Weak<dyn Store>) -> Router {
    handle();
    let exposition = Arc::new(Exposition { store, last: Mutex::new(None) });
    Router::new().route("/metrics", get(scrape)).with_state(exposition)
}

async fn scrape(State(exposition): State<Arc<Exposition>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], exposition.current().await)
}

/// The last render of one listener's `/metrics`, and the store its gauges are read from.
struct Exposition {
    store: Weak<dyn Store>,
    /// When the render was finished, and the page. The lock is held through a render, so
    /// scrapes that arrive meanwhile wait for it and share it instead of rendering again.
    last: Mutex<Option<(Instant, Bytes)>>,
}

impl Exposition {
    async fn current(&self) -> Bytes {
        let mut last = self.last.lock().await;
        if let Some((rendered, page)) = &*last
            && rendered.elapsed() < SCRAPE_CACHE_PERIOD
        {
            return page.clone();
        }
        if let Some(store) = self.store.upgrade() {
            refresh_store_gauges(store.as_ref()).await;
        }
        counter!(RENDERS).increment(1);
        let page = Bytes::from(handle().render());
        // Aged from the end of the render: after a slow store the waiting scrapes take this
        // page instead of each reading the store again.
        *last = Some((Instant::now(), page.clone()));
        page
    }
}

/// The queue gauges and writability are read when the page is rendered, never per request:
/// one cheap count per render.
async fn refresh_store_gauges(store: &dyn Store) {
    let (writable, counts) = tokio::join!(
        tokio::time::timeout(SCRAPE_STORE_WAIT, store.ping()),
        tokio::time::timeout(SCRAPE_STORE_WAIT, store.queue_counts(store.now())),
    );
    store_writable(matches!(writable, Ok(Ok(()))));
    match counts {
        Ok(Ok(counts)) => queue_gauges(counts, store.now()),
        // The gauges keep their last values; `store_writable` already says something is wrong.
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot count the queue for /metrics"),
        Err(_) => tracing::warn!("counting the queue for /metrics took too long"),
    }
}

/// Sets the queue gauges to `counts`. A (channel, direction) the store no longer counts (its
/// jobs all delivered, or pruned) had its gauges set before: they go to zero rather than keep
/// their last values.
fn queue_gauges(counts: Vec<(String, Direction, QueueCounts)>, now: i64) {
    static SHOWN: std::sync::Mutex<Vec<(String, Direction)>> = std::sync::Mutex::new(Vec::new());
    let mut shown = SHOWN.lock().expect("queue gauges");
    for (channel, direction) in shown.iter() {
        if !counts.iter().any(|(c, d, _)| c == channel && d == direction) {
            queue_jobs(channel, *direction, QueueCounts::default(), now);
        }
    }
    *shown = counts.iter().map(|(channel, direction, _)| (channel.clone(), *direction)).collect();
    for (channel, direction, counts) in counts {
        queue_jobs(&channel, direction, counts, now);
    }
}

fn queue_jobs(channel: &str, direction: Direction, counts: QueueCounts, now: i64) {
    let oldest_age = counts.oldest_queued_at.map_or(0, |at| now.saturating_sub(at).max(0));
    gauge!(QUEUE_OLDEST_AGE, "channel" => channel.to_owned(), "direction" => direction.as_str())
        .set(oldest_age as f64 / 1000.0);
    let states =
        [("ready", counts.ready), ("delayed", counts.delayed), ("in_flight", counts.in_flight), ("dead", counts.dead)];
    for (state, jobs) in states {
        gauge!(QUEUE_JOBS, "channel" => channel.to_owned(), "direction" => direction.as_str(), "state" => state)
            .set(jobs as f64);
    }
}

pub fn store_writable(writable: bool) {
    gauge!(STORE_WRITABLE).set(if writable { 1.0 } else { 0.0 });
}

/// A connection the listener named `listener` closed to stay under its cap (see
/// [`crate::server`]).
pub fn connection_evicted(listener: &'static str, reason: &'static str) {
    counter!(CONNECTIONS_EVICTED, "listener" => listener, "reason" => reason).increment(1);
}

/// One answered request. `route` is the matched route template; `None` (no route matched) is
/// recorded as `unmatched`, since raw paths are unbounded.
/// `channel` is the configured channel the request served, once known; empty otherwise (probes,
/// refusals before the channel was found), never a name taken from a request unchecked.
pub fn http_request(route: Option<&str>, channel: Option<&str>, method: &Method, status: u16, elapsed: Duration) {
    let (route, channel, method) = (route.unwrap_or("unmatched"), channel.unwrap_or(""), method_label(method));
    let series = request_series(route, channel, method, status);
    series.requests.increment(1);
    series.duration.record(elapsed.as_secs_f64());
}

/// The series of one kind of request, resolved once: a label set looked up in the recorder
/// costs allocations and a hash of every label on each use, and every request makes one.
struct RequestSeries {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

/// Route → channel → (method, status): looked up by `&str`, so a request allocates nothing.
/// Bounded like the labels: route templates, configured channel names, known methods.
type RequestSeriesMap = HashMap<String, HashMap<String, HashMap<(&'static str, u16), Arc<RequestSeries>>>>;

fn request_series(route: &str, channel: &str, method: &'static str, status: u16) -> Arc<RequestSeries> {
    static SERIES: OnceLock<RwLock<RequestSeriesMap>> = OnceLock::new();
    let series = SERIES.get_or_init(RwLock::default);
    let found =
        series.read().expect("request series").get(route).and_then(|c| c.get(channel)?.get(&(method, status)).cloned());
    if let Some(found) = found {
        return found;
    }
    let made = Arc::new(RequestSeries {
        requests: counter!(HTTP_REQUESTS, "route" => route.to_owned(), "channel" => channel.to_owned(), "method" => method, "status" => status.to_string()),
        duration: histogram!(HTTP_DURATION, "route" => route.to_owned(), "channel" => channel.to_owned(), "method" => method),
    });
    let mut series = series.write().expect("request series");
    let entry = series.entry(route.to_owned()).or_default().entry(channel.to_owned()).or_default();
    Arc::clone(entry.entry((method, status)).or_insert(made))
}

/// Extension methods are any token a client sends: one series each would be unbounded.
fn method_label(method: &Method) -> &'static str {
    const KNOWN: [&str; 9] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"];
    KNOWN.into_iter().find(|known| *known == method.as_str()).unwrap_or("other")
}

/// How a delivery attempt ended, in both directions: the `outcome` of the attempt log line and
/// of the attempts metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the upstream.
    Sent,
    /// A transient failure: tried again later.
    Retry,
    /// Refused for good by the upstream.
    Rejected,
    /// Out of retries, or a stored job that cannot be read.
    Dead,
    /// Deferred by pacing; not an attempt.
    Paced,
    /// Held back by the channel's send rate; not an attempt.
    Held,
    /// Sent, and answered with a throttle: the job waits for the channel's pause; not counted
    /// against its retries.
    Throttled,
}

impl Outcome {
    /// In the order of the enum: `outcome as usize` indexes it.
    const ALL: [Self; 7] =
        [Self::Sent, Self::Retry, Self::Rejected, Self::Dead, Self::Paced, Self::Held, Self::Throttled];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Retry => "retry",
            Self::Rejected => "rejected",
            Self::Dead => "dead",
            Self::Paced => "paced",
            Self::Held => "held",
            Self::Throttled => "throttled",
        }
    }
}

/// One attempt, at `now`, of a job stored at `created_at` (both on the store's clock).
pub fn attempt(channel: &str, direction: Direction, outcome: Outcome, created_at: i64, now: i64) {
    let series = attempt_series(channel);
    let slot = direction.index();
    let label = || channel.to_owned();
    series.attempts[slot][outcome as usize]
        .get_or_init(|| {
            counter!(ATTEMPTS, "channel" => label(), "direction" => direction.as_str(), "outcome" => outcome.as_str())
        })
        .increment(1);
    if outcome == Outcome::Sent {
        let waited = now.saturating_sub(created_at).max(0);
        series.latency[slot]
            .get_or_init(|| histogram!(DELIVERY_LATENCY, "channel" => label(), "direction" => direction.as_str()))
            .record(waited as f64 / 1000.0);
        series.delivered[slot].add(now);
    }
}

/// How many jobs of `channel` this process delivered in `direction` within the hour before
/// `now` (the console's overview; a replica counts its own).
pub fn delivered_last_hour(channel: &str, direction: Direction, now: i64) -> u64 {
    attempt_series(channel).delivered[direction.index()].within_hour(now)
}

/// Deliveries per minute of the last hour: one slot a minute, reused an hour later.
struct Minutes {
    slots: [(std::sync::atomic::AtomicI64, std::sync::atomic::AtomicU64); 60],
}

impl Default for Minutes {
    fn default() -> Self {
        // Stamped with a minute no clock gives, so that an unused slot never counts.
        Self { slots: std::array::from_fn(|_| (i64::MIN.into(), 0.into())) }
    }
}

impl Minutes {
    fn add(&self, now: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let minute = now.div_euclid(60_000);
        let (stamp, count) = &self.slots[minute.rem_euclid(60) as usize];
        // The first delivery of a new minute takes the slot over from an hour ago; a delivery
        // racing it may land in either count, which an overview can bear.
        if stamp.swap(minute, Relaxed) != minute {
            count.store(0, Relaxed);
        }
        count.fetch_add(1, Relaxed);
    }

    fn within_hour(&self, now: i64) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        let minute = now.div_euclid(60_000);
        self.slots
            .iter()
            .filter(|(stamp, _)| (minute - 59..=minute).contains(&stamp.load(Relaxed)))
            .map(|(_, count)| count.load(Relaxed))
            .sum()
    }
}

/// A channel's attempt series, resolved once each (and only once used: a series of an outcome
/// that never happened is not shown at zero).
#[derive(Default)]
struct AttemptSeries {
    attempts: [[OnceLock<metrics::Counter>; Outcome::ALL.len()]; 2],
    latency: [OnceLock<metrics::Histogram>; 2],
    delivered: [Minutes; 2],
}

fn attempt_series(channel: &str) -> Arc<AttemptSeries> {
    static SERIES: OnceLock<RwLock<HashMap<String, Arc<AttemptSeries>>>> = OnceLock::new();
    let series = SERIES.get_or_init(RwLock::default);
    if let Some(found) = series.read().expect("attempt series").get(channel) {
        return Arc::clone(found);
    }
    Arc::clone(series.write().expect("attempt series").entry(channel.to_owned()).or_default())
}

/// What a stored webhook did not forward.
pub fn inbound_dropped(channel: &str, duplicates: usize, own_echoes: usize, ignored: usize) {
    for (reason, n) in [("duplicate", duplicates), ("own_echo", own_echoes), ("ignored", ignored)] {
        if n > 0 {
            counter!(DROPPED, "channel" => channel.to_owned(), "reason" => reason).increment(n as u64);
        }
    }
}

/// Entries of a webhook for a Page no channel of the app has (SPEC §4): acknowledged, not
/// forwarded. Labelled by the app (a name the operator chose), never by the Page id a caller sent.
pub fn unknown_page_dropped(app: &str, entries: usize) {
    counter!(DROPPED, "channel" => "", "app" => app.to_owned(), "reason" => "unknown_page").increment(entries as u64);
}

/// A `SIGHUP` reload: `applied` or `refused`.
pub fn send_rate(channel: &str, rate: f64) {
    gauge!(SEND_RATE, "channel" => channel.to_owned()).set(rate);
}

pub fn send_throttled(channel: &str) {
    counter!(THROTTLES, "channel" => channel.to_owned()).increment(1);
}

/// Spans a collector accepted (SPEC §6).
pub fn spans_exported(spans: usize) {
    counter!(SPANS_EXPORTED).increment(spans as u64);
}

/// Spans that will never reach a collector: `queue_full` or `export_failed`.
pub fn spans_dropped(reason: &'static str, spans: usize) {
    counter!(SPANS_DROPPED, "reason" => reason).increment(spans as u64);
}

pub fn config_reload(result: &'static str) {
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

pub fn receipt_posted(channel: &str, value: StatusValue) {
    let value = match value {
        StatusValue::Delivered => "delivered",
        StatusValue::Read => "read",
        StatusValue::Failed => "failed",
    };
    counter!(RECEIPTS_POSTED, "channel" => channel.to_owned(), "value" => value).increment(1);
}

/// A secret's value was used (SPEC §1, rotation): a check it matched, or an upstream took it.
/// `secret` is one of [`crate::rotation::SecretName`]'s labels; `owner` is the channel, the app,
/// or `relay` for the admin token (names the operator chose).
pub fn secret_used(secret: &'static str, owner: &str, previous: bool) {
    secret_counter(secret, owner, previous).increment(1);
    if previous {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        gauge!(SECRET_PREVIOUS_LAST_USED, "secret" => secret, "owner" => owner.to_owned()).set(now.as_secs_f64());
    }
}

/// The counter of uses of `secret`'s current or previous value, for keeping.
pub fn secret_counter(secret: &'static str, owner: &str, previous: bool) -> metrics::Counter {
    let value = if previous { "previous" } else { "current" };
    counter!(SECRET_MATCHES, "secret" => secret, "owner" => owner.to_owned(), "value" => value)
}

/// A secret now has a previous value: both of its series are shown, at zero until used.
pub fn secret_rotation_configured(secret: &'static str, owner: &str) {
    for value in ["current", "previous"] {
        counter!(SECRET_MATCHES, "secret" => secret, "owner" => owner.to_owned(), "value" => value).increment(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_chosen_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"PATCH").unwrap()), "PATCH");
        assert_eq!(method_label(&Method::from_bytes(b"X-CONTACT-1066835436691078").unwrap()), "other");
    }

    #[test]
    fn the_bucket_configuration_is_accepted() {
        assert!(builder().is_ok());
        for buckets in [HTTP_BUCKETS, LATENCY_BUCKETS, COMMIT_BUCKETS, BATCH_BUCKETS] {
            assert!(buckets.windows(2).all(|w| w[0] < w[1]), "buckets must ascend: {buckets:?}");
        }
    }

    #[test]
    fn outcomes_index_their_own_series() {
        for (index, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, index, "{outcome:?}");
        }
        let labels: std::collections::HashSet<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels.len(), Outcome::ALL.len());
    }
}
