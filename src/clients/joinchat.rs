//! JoinChat's `send_message` over HTTP, signed with `x-joinchat-signature` (SPEC §3.3, §3.5).

use std::time::{Duration, SystemTime};

use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, redirect};
use serde_json::Value;
use url::Url;

use super::{BoxFuture, JoinChatApi, SendError};
use crate::config::{JoinChatConfig, Secret};
use crate::domain::joinchat::SendRequest;
use crate::domain::text::truncate;
use crate::signing::joinchat_signature;

/// An error page can be large; the reason shown to a BonyChat agent needs only its start.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
const MAX_REASON_CHARS: usize = 300;

pub struct HttpJoinChat {
    http: reqwest::Client,
    url: Url,
    secret: Secret,
}

impl HttpJoinChat {
    pub fn new(config: &JoinChatConfig) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: http_client(config.connect_timeout, config.request_timeout)?,
            url: config.api_url.clone(),
            secret: config.api_secret.clone(),
        })
    }
}

/// The relay's HTTP client settings, shared by every upstream.
pub fn http_client(
    connect_timeout: Duration,
    request_timeout: Duration,
) -> Result<reqwest::Client, reqwest::Error> {
    // reqwest is built without a default crypto provider (ring compiles much faster than
    // aws-lc); the first client installs it. Installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .user_agent(concat!("bonychat-relay/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        // A redirected POST turns into a GET and loses its body: report it instead.
        .redirect(redirect::Policy::none())
        .build()
}

impl JoinChatApi for HttpJoinChat {
    fn send<'a>(&'a self, request: &'a SendRequest<'a>) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let body = request.to_bytes();
            let signature = joinchat_signature(self.secret.expose().as_bytes(), &body);
            let response = self
                .http
                .post(self.url.clone())
                .header(CONTENT_TYPE, "application/json")
                .header("x-joinchat-signature", signature)
                .body(body)
                .send()
                .await
                .map_err(|e| SendError::Transient {
                    reason: describe_transport_error(&e),
                    retry_after: None,
                })?;

            let status = response.status();
            let retry_after = retry_after(response.headers(), SystemTime::now());
            let answer = match read_capped(response).await {
                Ok(answer) => answer,
                // The status already says "accepted"; a `success: false` would have been short.
                Err(e) if status.is_success() => {
                    tracing::warn!(error = %e, "JoinChat accepted but its answer could not be read");
                    Vec::new()
                }
                Err(e) => {
                    return Err(SendError::Transient {
                        reason: describe_transport_error(&e),
                        retry_after,
                    });
                }
            };
            classify(status, retry_after, &answer)
        })
    }
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
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

fn describe_transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "JoinChat did not answer in time".into()
    } else if e.is_connect() {
        format!("cannot connect to JoinChat: {}", root_cause(e))
    } else {
        format!("request to JoinChat failed: {}", root_cause(e))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

/// SPEC §3.5: what a JoinChat answer means for the message.
pub fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    answer: &[u8],
) -> Result<(), SendError> {
    let json: Option<Value> = serde_json::from_slice(answer).ok();
    if status.is_success() {
        let refused = json
            .as_ref()
            .and_then(|v| v.get("success"))
            .is_some_and(|s| s == &Value::Bool(false));
        return match refused {
            false => Ok(()),
            true => Err(SendError::Permanent {
                reason: reason_from(json.as_ref(), answer)
                    .unwrap_or_else(|| format!("JoinChat answered {status} with success: false")),
            }),
        };
    }
    let reason = || {
        let answered = format!("JoinChat answered {status}");
        match reason_from(json.as_ref(), answer) {
            Some(detail) => format!("{answered}: {detail}"),
            None => answered,
        }
    };
    match status {
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => Err(SendError::Transient {
            reason: reason(),
            retry_after,
        }),
        s if s.is_server_error() => Err(SendError::Transient {
            reason: reason(),
            retry_after,
        }),
        s if s.is_client_error() => Err(SendError::Permanent {
            reason: reason_from(json.as_ref(), answer).unwrap_or_else(reason),
        }),
        s if s.is_redirection() => Err(SendError::Permanent {
            reason: format!("JoinChat answered {s} (a redirect): check JOINCHAT_API_URL"),
        }),
        s => Err(SendError::Permanent {
            reason: format!("JoinChat answered an unexpected {s}"),
        }),
    }
}

/// JoinChat's own words for a failure: `errors.msg` in its documented samples, with a few
/// common spellings (`error`, `message`) tolerated; else the start of a plain-text answer.
fn reason_from(json: Option<&Value>, answer: &[u8]) -> Option<String> {
    fn text_of(value: &Value) -> Option<String> {
        match value {
            Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Value::Object(fields) => {
                let text = ["msg", "message", "error", "detail"]
                    .iter()
                    .find_map(|key| fields.get(*key).and_then(text_of))?;
                match fields
                    .get("code")
                    .filter(|c| c.is_number() || c.is_string())
                {
                    Some(code) => Some(format!(
                        "{text} (code {})",
                        code.as_str()
                            .map_or_else(|| code.to_string(), str::to_owned)
                    )),
                    None => Some(text),
                }
            }
            Value::Array(items) => items.iter().find_map(text_of),
            _ => None,
        }
    }
    let text = match json {
        Some(value) => ["errors", "error", "message", "msg"]
            .iter()
            .find_map(|key| value.get(*key).and_then(text_of)),
        None => std::str::from_utf8(answer)
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
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

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn permanent(reason: &str) -> Result<(), SendError> {
        Err(SendError::Permanent {
            reason: reason.into(),
        })
    }

    #[test]
    fn a_2xx_is_sent_unless_it_says_success_false() {
        assert_eq!(
            classify(
                StatusCode::OK,
                None,
                br#"{"success":true,"recipient_id":"1"}"#
            ),
            Ok(())
        );
        assert_eq!(classify(StatusCode::OK, None, b""), Ok(()));
        assert_eq!(classify(StatusCode::ACCEPTED, None, b"queued"), Ok(()));
        assert_eq!(
            classify(
                StatusCode::OK,
                None,
                br#"{"success": false, "errors": {"code": 10010, "msg": "Recipient not found"}}"#
            ),
            permanent("Recipient not found (code 10010)")
        );
        assert_eq!(
            classify(
                StatusCode::OK,
                None,
                br#"{"success": false, "error": "Invalid signature"}"#
            ),
            permanent("Invalid signature")
        );
        assert_eq!(
            classify(StatusCode::OK, None, br#"{"success": false}"#),
            permanent("JoinChat answered 200 OK with success: false")
        );
    }

    #[test]
    fn client_errors_are_permanent_with_joinchat_s_reason() {
        assert_eq!(
            classify(
                StatusCode::BAD_REQUEST,
                None,
                br#"{"success":false,"errors":"Unknow errors"}"#
            ),
            permanent("Unknow errors")
        );
        assert_eq!(
            classify(StatusCode::FORBIDDEN, None, b""),
            permanent("JoinChat answered 403 Forbidden")
        );
        assert_eq!(
            classify(StatusCode::NOT_FOUND, None, b"no such page\n"),
            permanent("no such page")
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
            let result = classify(status, Some(Duration::from_secs(3)), b"");
            assert!(
                matches!(
                    result,
                    Err(SendError::Transient {
                        retry_after: Some(_),
                        ..
                    })
                ),
                "{status}: {result:?}"
            );
        }
        assert_eq!(
            classify(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                br#"{"message":"maintenance"}"#
            ),
            Err(SendError::Transient {
                reason: "JoinChat answered 503 Service Unavailable: maintenance".into(),
                retry_after: None
            })
        );
    }

    #[test]
    fn a_redirect_is_reported_as_a_configuration_problem() {
        let result = classify(StatusCode::MOVED_PERMANENTLY, None, b"");
        assert!(
            matches!(result, Err(SendError::Permanent { reason }) if reason.contains("JOINCHAT_API_URL"))
        );
    }

    #[test]
    fn long_reasons_are_truncated() {
        let answer = "x".repeat(5000);
        let Err(SendError::Permanent { reason }) =
            classify(StatusCode::BAD_REQUEST, None, answer.as_bytes())
        else {
            panic!()
        };
        assert_eq!(reason.chars().count(), MAX_REASON_CHARS);
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
}
