//! Logging: the subscriber, and one line per HTTP request.
//!
//! The level comes from `RUST_LOG` (default `info`), the format from `RELAY_LOG_FORMAT`.
//! Request lines carry the request id, method, route, status and latency; never headers, and
//! never the query string (the Messenger handshake puts its verify token there).

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};
use crate::error::{InternalErrorDetail, RefusalDetail};

/// Installs the global subscriber; a second call (as in tests) leaves the first in place.
pub fn init(config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = match config.log_format {
        LogFormat::Pretty => builder.with_ansi(colours_wanted()).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
}

/// Whether pretty logs may carry colour codes: only when they go to a terminal (the subscriber
/// writes to standard output). Piped to a file, `journald` or a log shipper, the escape
/// sequences would only garble the lines and break `grep`. `NO_COLOR` (<https://no-color.org>)
/// turns them off on a terminal too, as the subscriber does by default.
fn colours_wanted() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// Request ids: UUIDv4-shaped, from a thread-local generator (no system call per request).
#[derive(Clone, Copy, Default)]
pub struct MakeRequestId;

impl tower_http::request_id::MakeRequestId for MakeRequestId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<tower_http::request_id::RequestId> {
        let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
        axum::http::HeaderValue::from_str(&id.hyphenated().to_string()).ok().map(Into::into)
    }
}

/// The longest caller-given request id that is kept.
const MAX_REQUEST_ID_LEN: usize = 64;

/// Removes a caller's `x-request-id` unless it is one short id of `[A-Za-z0-9._:-]`, so that
/// a generated one takes its place: the id is echoed and written to every log line, where a
/// long or odd one would bloat the logs or forge their fields.
pub fn drop_unfit_request_id(mut request: Request) -> Request {
    let mut ids = request.headers().get_all("x-request-id").iter();
    let fit = match (ids.next(), ids.next()) {
        (None, _) => true,
        (Some(id), None) => is_fit_request_id(id.as_bytes()),
        // Which of several would be echoed and logged is not the caller's to choose.
        (Some(_), Some(_)) => false,
    };
    if !fit {
        request.headers_mut().remove("x-request-id");
    }
    request
}

fn is_fit_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Health probes arrive every few seconds; they are logged at debug level only.
fn is_probe(route: &str) -> bool {
    matches!(route, "/healthz" | "/readyz")
}

/// The channel a request turned out to serve, set by its handler once the channel is known
/// (and its name is one the operator configured, so it may become a label).
#[derive(Clone, Default)]
pub struct ServedChannel(Arc<OnceLock<String>>);

impl ServedChannel {
    pub fn set(&self, channel: &str) {
        let _ = self.0.set(channel.to_owned());
    }

    pub(crate) fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

pub async fn log_request(mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let served = ServedChannel::default();
    request.extensions_mut().insert(served.clone());
    let method = request.method().clone();
    // Shared, not copied: a request allocates nothing for its log line and metrics.
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let unmatched_path = matched.is_none().then(|| request.uri().path().to_owned());
    let route = matched.as_ref().map_or_else(|| unmatched_path.as_deref().unwrap_or(""), MatchedPath::as_str);
    let request_id_header = request.headers().get("x-request-id").cloned();
    let request_id = request_id_header.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-");
    let span = tracing::info_span!("request", request_id = %request_id);

    let response = next.run(request).instrument(span).await;

    let status = response.status().as_u16();
    let channel = served.get();
    crate::monitoring::http_request(
        matched.as_ref().map(MatchedPath::as_str),
        channel,
        &method,
        status,
        started.elapsed(),
    );
    let latency_ms = (started.elapsed().as_secs_f64() * 1000.0 * 10.0).round() / 10.0;
    if let Some(InternalErrorDetail(detail)) = response.extensions().get() {
        tracing::error!(%request_id, %method, %route, channel, status, latency_ms, error = %detail, "request");
    } else if let Some(RefusalDetail(reason)) = response.extensions().get() {
        tracing::warn!(%request_id, %method, %route, channel, status, latency_ms, reason = %reason, "request");
    } else if is_probe(route) {
        tracing::debug!(%request_id, %method, %route, status, latency_ms, "request");
    } else {
        tracing::info!(%request_id, %method, %route, channel, status, latency_ms, "request");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(ids: &[&str]) -> Option<String> {
        let mut request = Request::new(axum::body::Body::empty());
        for id in ids {
            request.headers_mut().append("x-request-id", id.parse().unwrap());
        }
        let request = drop_unfit_request_id(request);
        request.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn only_short_plain_request_ids_are_kept() {
        assert_eq!(kept(&["bony-123"]).as_deref(), Some("bony-123"));
        assert_eq!(kept(&["a.b_c:d-E9"]).as_deref(), Some("a.b_c:d-E9"));
        assert_eq!(kept(&[&"x".repeat(64)]).map(|id| id.len()), Some(64));
        assert_eq!(kept(&[&"x".repeat(65)]), None);
        assert_eq!(kept(&["has space"]), None);
        assert_eq!(kept(&["quote\"level=error"]), None);
        assert_eq!(kept(&["one", "two"]), None);
        assert_eq!(kept(&[]), None);
    }
}
