//! Logging: the subscriber, and one line per HTTP request.
//!
//! The level comes from `RUST_LOG` (default `info`), the format from `RELAY_LOG_FORMAT`.
//! Request lines carry the request id, method, route, status and latency; never headers, and
//! never the query string (the Messenger handshake puts its verify token there).

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};
use crate::error::InternalErrorDetail;

/// Installs the global subscriber; a second call (as in tests) leaves the first in place.
pub fn init(config: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    let _ = match config.log_format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
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

/// Health probes arrive every few seconds; they are logged at debug level only.
fn is_probe(route: &str) -> bool {
    matches!(route, "/healthz" | "/readyz")
}

pub async fn log_request(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = match request.extensions().get::<MatchedPath>() {
        Some(matched) => matched.as_str().to_owned(),
        None => request.uri().path().to_owned(),
    };
    let request_id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
    let span = tracing::info_span!("request", request_id = %request_id);

    let response = next.run(request).instrument(span).await;

    let status = response.status().as_u16();
    let latency_ms = (started.elapsed().as_secs_f64() * 1000.0 * 10.0).round() / 10.0;
    if let Some(InternalErrorDetail(detail)) = response.extensions().get() {
        tracing::error!(%request_id, %method, %route, status, latency_ms, error = %detail, "request");
    } else if is_probe(&route) {
        tracing::debug!(%request_id, %method, %route, status, latency_ms, "request");
    } else {
        tracing::info!(%request_id, %method, %route, status, latency_ms, "request");
    }
    response
}
