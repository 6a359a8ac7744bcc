//! JoinChat's `send_message` over HTTP, signed with `x-joinchat-signature` (SPEC §3.3, §3.5).

use std::time::SystemTime;

use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;
use url::Url;

use super::{BoxFuture, JoinChatApi, SendError, http};
use crate::config::{JoinChatConfig, Secret};

use super::http::{unknown_credential, with_trace_headers};
use crate::domain::joinchat::SendRequest;
use crate::rotation::{Outgoing, SecretUse, credential_accepted, credential_refused};
use crate::signing::joinchat_signature;

const UPSTREAM: &str = "JoinChat";

pub struct HttpJoinChat {
    http: reqwest::Client,
    url: Url,
    /// `JOINCHAT_API_SECRET` and, during a rotation, its previous value (SPEC §1).
    secret: Outgoing,
}

impl HttpJoinChat {
    /// `http` is the relay's one JoinChat client, shared by every channel (one connection pool).
    pub fn new(http: reqwest::Client, config: &JoinChatConfig, usage: SecretUse) -> Self {
        Self {
            http,
            url: config.api_url.url().clone(),
            secret: Outgoing::new(config.api_secret.clone(), usage, UPSTREAM),
        }
    }
}

impl JoinChatApi for HttpJoinChat {
    fn send<'a>(&'a self, request: &'a SendRequest<'a>) -> BoxFuture<'a, Result<(), SendError>> {
        Box::pin(async move {
            let body = axum::body::Bytes::from(request.to_bytes());
            let trace = crate::traces::outgoing_trace_headers();
            // Signed with the secret that goes first; when JoinChat refuses it and a rotation
            // is under way, the same bytes go once more signed with the other one (SPEC §1).
            let sign_and_send = |secret: &Secret| {
                let signature = joinchat_signature(secret.expose().as_bytes(), &body);
                let request = self
                    .http
                    .post(self.url.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .header("x-joinchat-signature", signature);
                with_trace_headers(request, &trace).body(body.clone()).send()
            };
            let response = self
                .secret
                .send(sign_and_send, |r| credential_refused(r.status()), |r| credential_accepted(r.status()))
                .await
                .map_err(|e| http::transport_error(UPSTREAM, &self.url, &e))?;

            let status = response.status();
            let retry_after = http::retry_after(response.headers(), SystemTime::now());
            let answer = match http::read_capped(response).await {
                Ok(answer) => answer,
                // The status already says "accepted"; a `success: false` would have been short.
                Err(e) if status.is_success() => {
                    tracing::warn!(error = %e.without_url(), "JoinChat accepted but its answer could not be read");
                    Vec::new()
                }
                Err(e) => return Err(http::transport_error(UPSTREAM, &self.url, &e)),
            };
            if status == StatusCode::UNAUTHORIZED && self.secret.was_taken() {
                return Err(unknown_credential(UPSTREAM, "JOINCHAT_API_SECRET", status, retry_after, &answer));
            }
            classify(status, retry_after, &answer)
        })
    }
}

/// Meta's rate-limit error codes (SPEC §5): 4 (app), 17 (user), 32 (Page), 613 ("Calls to this
/// api have exceeded the rate limit"), and the Business Use Case codes 80000–80014.
fn is_rate_limit_code(code: i64) -> bool {
    matches!(code, 4 | 17 | 32 | 613 | 80_000..=80_014)
}

/// The rate-limit code of an error answer, in JoinChat's documented shape
/// (`{"success": false, "errors": {"code": …, "msg": …}}`, or `error` as one sample spells it)
/// or Meta's own (`{"error": {"code": …, "error_subcode": …}}`) passed through; a code may be
/// written as a number or a string.
fn rate_limit_code(answer: &[u8]) -> Option<i64> {
    let value = serde_json::from_slice::<Value>(answer).ok()?;
    let code_of = |value: &Value| match value {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let errors = ["errors", "error"].into_iter().filter_map(|key| value.get(key));
    let candidates = errors
        .flat_map(|error| {
            let first = error.as_array().and_then(|items| items.first()).unwrap_or(error);
            [first.get("code"), first.get("error_subcode")]
        })
        .chain([value.get("code")])
        .flatten();
    candidates.filter_map(code_of).find(|code| is_rate_limit_code(*code))
}

/// SPEC §3.5: a 2xx is sent unless its body says `"success": false`; a 429, or an error body
/// naming one of Meta's rate-limit codes whatever the status, is a throttle (SPEC §5).
pub fn classify(status: StatusCode, retry_after: Option<std::time::Duration>, answer: &[u8]) -> Result<(), SendError> {
    let code = if status.is_success() && !says_success_false(answer) { None } else { rate_limit_code(answer) };
    if status == StatusCode::TOO_MANY_REQUESTS || code.is_some() {
        let said = http::reason_from(answer).map(|reason| format!(": {reason}")).unwrap_or_default();
        return Err(SendError::Throttled {
            reason: format!("JoinChat throttled the Page ({status}{said})"),
            retry_after,
            status: Some(status.as_u16()),
        });
    }
    if !status.is_success() {
        return Err(http::classify_failure(UPSTREAM, status, retry_after, answer));
    }
    if says_success_false(answer) {
        return Err(SendError::Permanent {
            reason: http::reason_from(answer)
                .unwrap_or_else(|| format!("JoinChat answered {status} with success: false")),
            status: Some(status.as_u16()),
        });
    }
    Ok(())
}

fn says_success_false(answer: &[u8]) -> bool {
    serde_json::from_slice::<Value>(answer).ok().and_then(|v| v.get("success").cloned()) == Some(Value::Bool(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused for good with a 200 saying `success: false`.
    fn permanent(reason: &str) -> Result<(), SendError> {
        Err(SendError::Permanent { reason: reason.into(), status: Some(200) })
    }

    #[test]
    fn a_2xx_is_sent_unless_it_says_success_false() {
        assert_eq!(classify(StatusCode::OK, None, br#"{"success":true,"recipient_id":"1"}"#), Ok(()));
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
            classify(StatusCode::OK, None, br#"{"success": false, "error": "Invalid signature"}"#),
            permanent("Invalid signature")
        );
        assert_eq!(
            classify(StatusCode::OK, None, br#"{"success": false}"#),
            permanent("JoinChat answered 200 OK with success: false")
        );
    }

    fn throttled(result: Result<(), SendError>) -> Option<Option<std::time::Duration>> {
        match result {
            Err(SendError::Throttled { retry_after, .. }) => Some(retry_after),
            _ => None,
        }
    }

    #[test]
    fn a_429_or_a_meta_rate_limit_code_is_a_throttle() {
        let after = Some(std::time::Duration::from_secs(2));
        assert_eq!(throttled(classify(StatusCode::TOO_MANY_REQUESTS, after, b"")), Some(after));
        for body in [
            r#"{"success": false, "errors": {"code": 613, "msg": "Calls to this api have exceeded the rate limit."}}"#,
            r#"{"success": false, "error": {"code": "32", "msg": "Page request limit reached"}}"#,
            r#"{"error": {"message": "(#4) Application request limit reached", "type": "OAuthException", "code": 4}}"#,
            r#"{"error": {"message": "User request limit reached", "code": 17, "fbtrace_id": "A"}}"#,
            r#"{"error": {"message": "limit", "code": 80006}}"#,
            r#"{"errors": [{"code": 613, "msg": "rate"}]}"#,
        ] {
            for status in [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::FORBIDDEN, StatusCode::BAD_GATEWAY] {
                if status.is_success() && !body.contains("success") {
                    continue;
                }
                assert_eq!(throttled(classify(status, None, body.as_bytes())), Some(None), "{status} {body}");
            }
        }
        let reason =
            match classify(StatusCode::OK, None, br#"{"success":false,"errors":{"code":613,"msg":"slow down"}}"#) {
                Err(SendError::Throttled { reason, .. }) => reason,
                other => panic!("{other:?}"),
            };
        assert_eq!(reason, "JoinChat throttled the Page (200 OK: slow down (code 613))");
    }

    #[test]
    fn other_codes_and_successes_are_not_throttles() {
        // A code 10010 answer is in a_2xx_is_sent_unless_it_says_success_false.
        assert_eq!(classify(StatusCode::OK, None, br#"{"success":true,"code":613}"#), Ok(()));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, None, br#"{"error": {"code": 100, "message": "Invalid parameter"}}"#),
            Err(SendError::Permanent { .. })
        ));
        assert!(matches!(classify(StatusCode::SERVICE_UNAVAILABLE, None, b""), Err(SendError::Transient { .. })));
    }

    #[test]
    fn failures_are_classified_like_any_upstream() {
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, None, br#"{"errors":{"msg":"Bad"}}"#),
            Err(SendError::Permanent { reason: "Bad".into(), status: Some(400) })
        );
        assert!(matches!(classify(StatusCode::BAD_GATEWAY, None, b""), Err(SendError::Transient { .. })));
    }
}
