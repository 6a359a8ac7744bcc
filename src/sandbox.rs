//! The sandbox: stand-ins for JoinChat and BonyChat, served by the relay itself under
//! `/sandbox/` when `RELAY_SANDBOX=true` (SPEC §6), so that a newcomer sees a message go each
//! way without an account.
//!
//! The relay reaches them through its ordinary clients over loopback HTTP: signing, the Bearer
//! token, retries and the store are the production code paths, only the far end is ours. Each
//! stand-in checks what the real upstream checks and keeps the last [`KEPT`] requests, readable
//! as JSON, with the check's verdict. They keep what they received in memory and let anyone who
//! reaches the port read it, which is why they are never mounted unless asked for.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::auth::BearerToken;
use crate::config::{Config, Secret};
use crate::error::ApiError;
use crate::routes::limits::BodyReader;
use crate::signing::joinchat_signature;
use crate::store::now_millis;

/// How many requests each stand-in keeps: enough to follow a session, bounded so that a
/// sandbox left running cannot grow without end.
pub const KEPT: usize = 100;
/// The text that makes the JoinChat stand-in refuse a request, to show `rejected_by_joinchat`.
pub const REJECT_MARKER: &str = "#reject";
/// Both upstreams' bodies are small; this is the relay's own webhook limit.
const BODY_LIMIT: usize = 1024 * 1024;

struct Sandbox {
    joinchat_secret: Secret,
    bonychat_token: BearerToken,
    joinchat: Received,
    bonychat: Received,
}

/// The last [`KEPT`] requests a stand-in received, oldest first.
#[derive(Default)]
struct Received(Mutex<VecDeque<Value>>);

impl Received {
    fn keep(&self, entry: Value) {
        let mut entries = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() == KEPT {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    fn all(&self) -> Vec<Value> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().cloned().collect()
    }
}

/// The stand-ins' routes, with their own state; logs the start warning, since mounting them is
/// what makes this relay a sandbox.
pub fn router<S: Clone + Send + Sync + 'static>(config: &Config) -> Router<S> {
    tracing::warn!(
        "RELAY_SANDBOX=true: THIS RELAY IS A SANDBOX. It serves stand-ins for JoinChat and BonyChat under \
         /sandbox/ that anyone reaching this port can read. Never use it in production."
    );
    let sandbox = Arc::new(Sandbox {
        joinchat_secret: config.joinchat.api_secret.clone(),
        bonychat_token: BearerToken::new(&config.bonychat.api_token),
        joinchat: Received::default(),
        bonychat: Received::default(),
    });
    Router::new()
        .route("/sandbox/joinchat/api/send_message", post(joinchat_send_message))
        .route("/sandbox/joinchat/requests", get(joinchat_requests))
        .route("/sandbox/bonychat/webhook", post(bonychat_webhook))
        .route("/sandbox/bonychat/events", get(bonychat_events))
        .with_state(sandbox)
}

/// JoinChat's `send_message`: checks `x-joinchat-signature` over the raw body and answers in
/// JoinChat's shapes (PROTOCOLS.md). A body containing [`REJECT_MARKER`] is refused with 400.
async fn joinchat_send_message(
    State(sandbox): State<Arc<Sandbox>>,
    Extension(reader): Extension<BodyReader>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = reader.read(body, BODY_LIMIT).await?;
    let bytes = &body.bytes;
    let expected = joinchat_signature(sandbox.joinchat_secret.expose().as_bytes(), bytes);
    let presented = headers.get("x-joinchat-signature").map(|v| v.as_bytes()).unwrap_or_default();
    let signature_valid: bool = presented.ct_eq(expected.as_bytes()).into();
    let parsed = as_json(bytes);

    let (status, answer) = if !signature_valid {
        (StatusCode::UNAUTHORIZED, json!({"success": false, "errors": {"msg": "signature mismatch"}}))
    } else if contains(bytes, REJECT_MARKER.as_bytes()) {
        let msg = format!("refused by the sandbox: the request contains {REJECT_MARKER}");
        (StatusCode::BAD_REQUEST, json!({"success": false, "errors": {"msg": msg}}))
    } else {
        let recipient = parsed["recipient"].as_object().and_then(|r| r.values().next()).cloned().unwrap_or(Value::Null);
        (StatusCode::OK, json!({"success": true, "recipient_id": recipient}))
    };
    sandbox.joinchat.keep(json!({
        "receivedAt": now_millis(),
        "headers": {
            "content-type": header_text(&headers, header::CONTENT_TYPE.as_str()),
            "x-joinchat-signature": header_text(&headers, "x-joinchat-signature"),
        },
        "body": parsed,
        "signatureValid": signature_valid,
        "status": status.as_u16(),
    }));
    Ok((status, Json(answer)).into_response())
}

/// BonyChat's Webhook URL: checks `Authorization: Bearer <BONYCHAT_API_TOKEN>` in constant time.
async fn bonychat_webhook(
    State(sandbox): State<Arc<Sandbox>>,
    Extension(reader): Extension<BodyReader>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = reader.read(body, BODY_LIMIT).await?;
    let bytes = &body.bytes;
    let token_valid = sandbox.bonychat_token.is_presented_in(&headers);
    let (status, answer) = if token_valid {
        (StatusCode::OK, json!({"status": "ok"}))
    } else {
        (StatusCode::UNAUTHORIZED, json!({"error": {"code": "unauthorized", "message": "invalid API token"}}))
    };
    // The token itself is not kept: the verdict says whether it was right.
    let authorization = headers.get(header::AUTHORIZATION).map(|value| {
        let scheme = value.as_bytes().split(|&b| b == b' ').next().unwrap_or_default();
        format!("{} [redacted]", String::from_utf8_lossy(scheme))
    });
    sandbox.bonychat.keep(json!({
        "receivedAt": now_millis(),
        "headers": {
            "content-type": header_text(&headers, header::CONTENT_TYPE.as_str()),
            "authorization": authorization,
        },
        "body": as_json(bytes),
        "tokenValid": token_valid,
        "status": status.as_u16(),
    }));
    Ok((status, Json(answer)).into_response())
}

async fn joinchat_requests(State(sandbox): State<Arc<Sandbox>>) -> Json<Value> {
    Json(json!({"requests": sandbox.joinchat.all()}))
}

async fn bonychat_events(State(sandbox): State<Arc<Sandbox>>) -> Json<Value> {
    Json(json!({"events": sandbox.bonychat.all()}))
}

/// The body as JSON, or as text when it is not JSON (a stand-in shows what it got either way).
fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stand_in_keeps_only_the_latest_requests() {
        let received = Received::default();

        for n in 0..KEPT + 50 {
            received.keep(json!(n));
        }

        let kept = received.all();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0], json!(50), "the oldest go first");
        assert_eq!(kept[KEPT - 1], json!(KEPT + 49));
    }

    #[test]
    fn the_reject_marker_is_found_anywhere_in_the_body() {
        assert!(contains(br#"{"text":"please #reject"}"#, REJECT_MARKER.as_bytes()));
        assert!(!contains(br#"{"text":"reject"}"#, REJECT_MARKER.as_bytes()));
        assert!(!contains(b"", REJECT_MARKER.as_bytes()));
    }
}
