//! JoinChat's `send_message` over HTTP, signed with `x-joinchat-signature` (SPEC §3.3, §3.5).

use std::time::SystemTime;

use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde_json::Value;
use url::Url;

use super::{BoxFuture, JoinChatApi, SendError, http};
use crate::config::{JoinChatConfig, Secret};

use crate::domain::joinchat::SendRequest;
use crate::rotation::{Outgoing, SecretUse, credential_accepted, credential_refused, unknown_credential};
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
            // Signed with the secret that goes first; when JoinChat refuses it and a rotation
            // is under way, the same bytes go once more signed with the other one (SPEC §1).
            let sign_and_send = |secret: &Secret| {
                let signature = joinchat_signature(secret.expose().as_bytes(), &body);
                self.http
                    .post(self.url.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .header("x-joinchat-signature", signature)
                    .body(body.clone())
                    .send()
            };
            let response = self
                .secret
                .send(sign_and_send, |r| credential_refused(r.status()), |r| credential_accepted(r.status()))
                .await
                .map_err(|e| http::transport_error(UPSTREAM, &e))?;

            let status = response.status();
            let retry_after = http::retry_after(response.headers(), SystemTime::now());
            let answer = match http::read_capped(response).await {
                Ok(answer) => answer,
                // The status already says "accepted"; a `success: false` would have been short.
                Err(e) if status.is_success() => {
                    tracing::warn!(error = %e.without_url(), "JoinChat accepted but its answer could not be read");
                    Vec::new()
                }
                Err(e) => return Err(http::transport_error(UPSTREAM, &e)),
            };
            if status == StatusCode::UNAUTHORIZED && self.secret.was_taken() {
                return Err(unknown_credential(UPSTREAM, "JOINCHAT_API_SECRET", status, retry_after, &answer));
            }
            classify(status, retry_after, &answer)
        })
    }
}

/// SPEC §3.5: a 2xx is sent unless its body says `"success": false`.
pub fn classify(status: StatusCode, retry_after: Option<std::time::Duration>, answer: &[u8]) -> Result<(), SendError> {
    if !status.is_success() {
        return Err(http::classify_failure(UPSTREAM, status, retry_after, answer));
    }
    let refused = serde_json::from_slice::<Value>(answer).ok().and_then(|v| v.get("success").cloned())
        == Some(Value::Bool(false));
    if refused {
        return Err(SendError::Permanent {
            reason: http::reason_from(answer)
                .unwrap_or_else(|| format!("JoinChat answered {status} with success: false")),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permanent(reason: &str) -> Result<(), SendError> {
        Err(SendError::Permanent { reason: reason.into() })
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

    #[test]
    fn failures_are_classified_like_any_upstream() {
        assert_eq!(classify(StatusCode::BAD_REQUEST, None, br#"{"errors":{"msg":"Bad"}}"#), permanent("Bad"));
        assert!(matches!(classify(StatusCode::BAD_GATEWAY, None, b""), Err(SendError::Transient { .. })));
    }
}
