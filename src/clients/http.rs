//! What every upstream client shares: client settings, reading answers, and telling a
//! transient failure from a permanent one.

use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, redirect};
use serde_json::Value;
use url::Url;

use super::SendError;
use crate::config::shown_url;
use crate::domain::text::truncate;
use crate::traces::TraceHeaders;

/// An error page can be large; the reason shown to a person needs only its start.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
const MAX_REASON_CHARS: usize = 300;
/// How long an idle upstream connection is kept for reuse.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The relay's HTTP client settings, shared by every upstream.
pub fn client(connect_timeout: Duration, request_timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    // reqwest is built without a default crypto provider (ring compiles much faster than
    // aws-lc); the first client installs it. Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("bonychat-relay/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout.min(request_timeout))
        .timeout(request_timeout)
        // A pooled connection idle for long may have been dropped silently on the way (a NAT or
        // a firewall forgets idle flows, AWS's NAT gateway after 350 s): reused, its request
        // would hang until the timeout. Thirty seconds also stays under the usual keep-alive of
        // load balancers (60 s) and nginx (75 s), so the server rarely closes one under a request.
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        // A redirected POST turns into a GET and loses its body: report it instead.
        .redirect(redirect::Policy::none())
        .build()
}

/// `request` with the current attempt's `traceparent` and `tracestate` (SPEC §6), those it has.
pub fn with_trace_headers(request: reqwest::RequestBuilder, trace: &TraceHeaders) -> reqwest::RequestBuilder {
    let mut request = request;
    if let Some(traceparent) = &trace.traceparent {
        request = request.header(crate::traces::TRACEPARENT, traceparent.clone());
    }
    if let Some(tracestate) = &trace.tracestate {
        request = request.header(crate::traces::TRACESTATE, tracestate.clone());
    }
    request
}

/// Reads at most 64 KiB of an answer.
pub async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut answer = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_ANSWER_BYTES - answer.len();
        answer.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if answer.len() == MAX_ANSWER_BYTES {
            break;
        }
    }
    Ok(answer)
}

/// A request that got no answer: always worth another attempt.
pub fn transport_error(upstream: &str, url: &Url, e: &reqwest::Error) -> SendError {
    SendError::Transient { reason: transport_reason(upstream, url, e), retry_after: None, status: None }
}

/// Why a request to `upstream` at `url` got no answer, in the operator's terms. The URL is shown
/// only with its credentials hidden ([`shown_url`]): some carry them in their query.
pub fn transport_reason(upstream: &str, url: &Url, e: &reqwest::Error) -> String {
    if url.scheme() == "https" && answered_in_plain_http(e) {
        // rustls alone says "received corrupt message of type InvalidContentType".
        return format!("{upstream} at {} speaks plain HTTP, not TLS: use http:// or fix the port", shown_url(url));
    }
    if e.is_timeout() {
        format!("{upstream} did not answer in time")
    } else if e.is_connect() {
        format!("cannot connect to {upstream}: {}", root_cause(e))
    } else {
        format!("request to {upstream} failed: {}", root_cause(e))
    }
}

/// Whether the TLS handshake failed because the first bytes the server sent were no TLS record
/// at all, as when a plain HTTP server answers a ClientHello with `HTTP/1.1 400`: its `H` is
/// no TLS content type. rustls's error travels inside `io::Error`s (nested: the connector wraps
/// the TLS stream's), whose `source` skips what they wrap, so each is opened too.
fn answered_in_plain_http(e: &(dyn std::error::Error + 'static)) -> bool {
    if matches!(
        e.downcast_ref::<rustls::Error>(),
        Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType))
    ) {
        return true;
    }
    let wrapped = e.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref);
    wrapped.is_some_and(|inner| answered_in_plain_http(inner)) || e.source().is_some_and(answered_in_plain_http)
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// A non-2xx answer: 408, 429 and 5xx are transient, other 4xx permanent (SPEC §3.5), and a
/// redirect means the URL is misconfigured.
pub fn classify_failure(upstream: &str, status: StatusCode, retry_after: Option<Duration>, answer: &[u8]) -> SendError {
    let detail = reason_from(answer);
    let answered = match &detail {
        Some(detail) => format!("{upstream} answered {status}: {detail}"),
        None => format!("{upstream} answered {status}"),
    };
    match status {
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
            SendError::Transient { reason: answered, retry_after, status: Some(status.as_u16()) }
        }
        s if s.is_server_error() => SendError::Transient { reason: answered, retry_after, status: Some(s.as_u16()) },
        s if s.is_client_error() => {
            SendError::Permanent { reason: detail.unwrap_or(answered), status: Some(s.as_u16()) }
        }
        s if s.is_redirection() => SendError::Permanent {
            reason: format!("{upstream} answered {s} (a redirect): check its URL setting"),
            status: Some(s.as_u16()),
        },
        s => {
            SendError::Permanent { reason: format!("{upstream} answered an unexpected {s}"), status: Some(s.as_u16()) }
        }
    }
}

/// The upstream's own words for a failure: `errors.msg` (JoinChat's documented shape), `error`,
/// `message` and a few other common spellings; else the start of a plain-text answer.
pub fn reason_from(answer: &[u8]) -> Option<String> {
    fn text_of(value: &Value) -> Option<String> {
        match value {
            Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Value::Object(fields) => {
                let text =
                    ["msg", "message", "error", "detail"].iter().find_map(|key| fields.get(*key).and_then(text_of))?;
                match fields.get("code").filter(|c| c.is_number() || c.is_string()) {
                    Some(code) => {
                        Some(format!("{text} (code {})", code.as_str().map_or_else(|| code.to_string(), str::to_owned)))
                    }
                    None => Some(text),
                }
            }
            Value::Array(items) => items.iter().find_map(text_of),
            _ => None,
        }
    }
    let text = match serde_json::from_slice::<Value>(answer) {
        Ok(value) => ["errors", "error", "message", "msg"].iter().find_map(|key| value.get(*key).and_then(text_of)),
        Err(_) => std::str::from_utf8(answer).ok().map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned),
    };
    text.map(|t| truncate(&t, MAX_REASON_CHARS).into_owned())
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What an attempt ends with when the upstream answered 401 to every value of the secret the
/// relay holds although it took one of them earlier ([`Outgoing::was_taken`](crate::rotation::Outgoing::was_taken)): its value
/// changed under the relay.
///
/// That is a rotation done upstream first (the only order possible when the upstream generates
/// the value and drops the old one at once): not the message's fault, and not for good either,
/// since the operator's next step (the new value, then `SIGHUP`) lets a later attempt through.
/// So the attempt is retried on the schedule instead of being rejected, and the messages of the
/// gap are delivered once the relay has the new value. A credential the upstream never took
/// since the start (or the last reload) is simply wrong: its 401 stays a rejection for good, as
/// SPEC §3.5 says of any 4xx, and so does a 403 (authenticated but not allowed, such as a Page
/// not bound to the bot).
pub fn unknown_credential(
    upstream: &str,
    secret: &str,
    status: StatusCode,
    retry_after: Option<std::time::Duration>,
    answer: &[u8],
) -> SendError {
    let detail = reason_from(answer).map(|d| format!(": {d}")).unwrap_or_default();
    SendError::Transient {
        reason: format!(
            "{upstream} answered {status}{detail}; it took {secret} before and takes none of the values the \
             relay holds now, as when it was rotated there first (retried: the new value and SIGHUP let it through)"
        ),
        retry_after,
        status: Some(status.as_u16()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn client_errors_are_permanent_with_the_upstream_s_reason() {
        assert_eq!(
            classify_failure(
                "JoinChat",
                StatusCode::BAD_REQUEST,
                None,
                br#"{"success":false,"errors":"Unknow errors"}"#
            ),
            SendError::Permanent { reason: "Unknow errors".into(), status: Some(400) }
        );
        assert_eq!(
            classify_failure("BonyChat", StatusCode::FORBIDDEN, None, b""),
            SendError::Permanent { reason: "BonyChat answered 403 Forbidden".into(), status: Some(403) }
        );
        assert_eq!(
            classify_failure("JoinChat", StatusCode::NOT_FOUND, None, b"no such page\n"),
            SendError::Permanent { reason: "no such page".into(), status: Some(404) }
        );
    }

    #[test]
    fn timeouts_throttling_and_server_errors_are_transient() {
        for status in [
            StatusCode::REQUEST_TIMEOUT,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::BAD_GATEWAY,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            let error = classify_failure("JoinChat", status, Some(Duration::from_secs(3)), b"");
            assert!(matches!(error, SendError::Transient { retry_after: Some(_), .. }), "{status}: {error:?}");
        }
        assert_eq!(
            classify_failure("JoinChat", StatusCode::SERVICE_UNAVAILABLE, None, br#"{"message":"maintenance"}"#),
            SendError::Transient {
                reason: "JoinChat answered 503 Service Unavailable: maintenance".into(),
                retry_after: None,
                status: Some(503)
            }
        );
    }

    #[test]
    fn a_redirect_is_reported_as_a_configuration_problem() {
        let error = classify_failure("BonyChat", StatusCode::MOVED_PERMANENTLY, None, b"");
        assert!(matches!(error, SendError::Permanent { reason, .. } if reason.contains("check its URL")));
    }

    #[test]
    fn reasons_read_the_common_error_shapes_and_are_truncated() {
        assert_eq!(
            reason_from(br#"{"errors":{"code":10010,"msg":"Recipient not found"}}"#).as_deref(),
            Some("Recipient not found (code 10010)")
        );
        assert_eq!(
            reason_from(br#"{"error":{"message":"Invalid token","code":"E1"}}"#).as_deref(),
            Some("Invalid token (code E1)")
        );
        assert_eq!(reason_from(br#"{"errors":[{"detail":"bad"}]}"#).as_deref(), Some("bad"));
        assert_eq!(reason_from(br#"{"success":false}"#), None);
        assert_eq!(reason_from(b"   "), None);
        assert_eq!(reason_from("x".repeat(5000).as_bytes()).unwrap().chars().count(), MAX_REASON_CHARS);
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers, now), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(120));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(120)));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers, now), None);
    }

    #[test]
    fn a_401_to_every_value_is_retried_with_the_upstream_s_reason() {
        let error = unknown_credential(
            "JoinChat",
            "JOINCHAT_API_SECRET",
            StatusCode::UNAUTHORIZED,
            None,
            br#"{"success":false,"errors":{"msg":"signature mismatch"}}"#,
        );
        let SendError::Transient { reason, retry_after: None, status: Some(401) } = error else {
            panic!("retried, not rejected: {error:?}");
        };
        assert!(reason.starts_with("JoinChat answered 401 Unauthorized: signature mismatch; it took"), "{reason}");
        assert!(reason.contains("JOINCHAT_API_SECRET"), "{reason}");
    }
}
