//! The sandbox: stand-ins for JoinChat and BonyChat, served by the relay itself under
//! `/sandbox/` when `RELAY_SANDBOX=true` (SPEC §6), so that a newcomer sees a message go each
//! way without an account.
//!
//! The relay reaches them through its ordinary clients over loopback HTTP: signing, the Bearer
//! token, retries and the store are the production code paths, only the far end is ours. Each
//! stand-in checks what the real upstream checks and keeps the last [`KEPT`] requests, readable
//! as JSON, with the check's verdict. They keep what they received in memory and let anyone who
//! reaches the port read it, which is why they are never mounted unless asked for.
//!
//! A sandbox left on by mistake is posted to by anyone: what the stand-ins keep is bounded in
//! bytes, not only in entries ([`KEPT_BODY_BYTES`] of each body, [`KEPT_BYTES`] in all), and
//! each entry is kept as the JSON text it is served as, so reading the log copies at most
//! [`KEPT_BYTES`] instead of building and serialising a tree of everything received.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::limits::BodyReader;
use crate::auth::BearerToken;
use crate::config::{Config, Rotating, Secret};
use crate::domain::channel::DEFAULT_CHANNEL;
use crate::error::ApiError;
use crate::signing::joinchat_signature;
use crate::store::now_millis;

/// How many requests each stand-in keeps: enough to follow a session, bounded so that a
/// sandbox left running cannot grow without end.
pub const KEPT: usize = 100;
/// How much of a body an entry keeps. What the relay sends is smaller (a JoinChat request or a
/// BonyChat post is a few KiB at most), so a bigger body is no relay's: it is kept cut, with
/// its size, instead of a megabyte per entry.
pub const KEPT_BODY_BYTES: usize = 16 * 1024;
/// How many bytes of entries each stand-in keeps at most, as served: the oldest go first.
pub const KEPT_BYTES: usize = 1024 * 1024;
/// How much of a header value an entry shows (a signature is 44 characters).
const KEPT_HEADER_BYTES: usize = 256;
/// The text that makes the JoinChat stand-in refuse a request, to show `rejected_by_joinchat`.
pub const REJECT_MARKER: &str = "#reject";
/// Both upstreams' bodies are small; this is the relay's own webhook limit.
const BODY_LIMIT: usize = 1024 * 1024;

/// The stand-ins of every channel, each checking that channel's secret and token and keeping
/// what it received apart from the others'.
struct Sandbox {
    channels: HashMap<String, StandIns>,
}

struct StandIns {
    joinchat_secret: Secret,
    bonychat_token: BearerToken,
    joinchat: Received,
    bonychat: Received,
}

impl Sandbox {
    fn of(&self, channel: &str) -> Result<&StandIns, ApiError> {
        self.channels.get(channel).ok_or(ApiError::NotFound)
    }
}

/// The last requests a stand-in received, oldest first: at most [`KEPT`] of them and
/// [`KEPT_BYTES`] in all, each as its JSON text.
#[derive(Default)]
struct Received(Mutex<Kept>);

#[derive(Default)]
struct Kept {
    entries: VecDeque<Bytes>,
    bytes: usize,
}

impl Received {
    fn keep(&self, entry: &Value) {
        // Serialised before taking the lock: readers and other writers never wait on it.
        let entry = Bytes::from(serde_json::to_vec(entry).expect("JSON values serialize"));
        let mut kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while kept.entries.len() >= KEPT || (!kept.entries.is_empty() && kept.bytes + entry.len() > KEPT_BYTES) {
            let oldest = kept.entries.pop_front().expect("not empty");
            kept.bytes -= oldest.len();
        }
        kept.bytes += entry.len();
        kept.entries.push_back(entry);
    }

    /// `{"<key>": [entries…]}`, written from the kept text: the lock is held only to count
    /// references, and nothing is parsed or serialised again.
    fn serve(&self, key: &str) -> Response {
        let (entries, bytes) = {
            let kept = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (kept.entries.iter().cloned().collect::<Vec<Bytes>>(), kept.bytes)
        };
        let mut body = Vec::with_capacity(bytes + entries.len() + key.len() + 8);
        body.extend_from_slice(format!("{{\"{key}\":[").as_bytes());
        for (index, entry) in entries.iter().enumerate() {
            if index > 0 {
                body.push(b',');
            }
            body.extend_from_slice(entry);
        }
        body.extend_from_slice(b"]}");
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// The stand-ins' routes, with their own state; logs the start warning, since mounting them is
/// what makes this relay a sandbox.
pub fn router<S: Clone + Send + Sync + 'static>(config: &Config) -> Router<S> {
    tracing::warn!(
        "RELAY_SANDBOX=true: THIS RELAY IS A SANDBOX. It serves stand-ins for JoinChat and BonyChat under \
         /sandbox/ that anyone reaching this port can read. Never use it in production."
    );
    // The channels at start: a channel added by a reload has no stand-ins until a restart.
    let channels = config
        .channels
        .channels
        .iter()
        .map(|(name, channel)| {
            let stand_ins = StandIns {
                // The stand-ins hold what the real upstreams would: the current values.
                joinchat_secret: channel.joinchat.api_secret.current.clone(),
                bonychat_token: BearerToken::new(&Rotating::new(channel.bonychat.api_token.current.clone()), None),
                joinchat: Received::default(),
                bonychat: Received::default(),
            };
            (name.clone(), stand_ins)
        })
        .collect();
    let sandbox = Arc::new(Sandbox { channels });
    Router::new()
        .route("/sandbox/joinchat/api/send_message", post(default_joinchat_send_message))
        .route("/sandbox/joinchat/requests", get(default_joinchat_requests))
        .route("/sandbox/bonychat/webhook", post(default_bonychat_webhook))
        .route("/sandbox/bonychat/events", get(default_bonychat_events))
        .route("/sandbox/channels/{channel}/joinchat/api/send_message", post(joinchat_send_message))
        .route("/sandbox/channels/{channel}/joinchat/requests", get(joinchat_requests))
        .route("/sandbox/channels/{channel}/bonychat/webhook", post(bonychat_webhook))
        .route("/sandbox/channels/{channel}/bonychat/events", get(bonychat_events))
        .with_state(sandbox)
}

/// The stand-ins of the channel `default`, at the paths a single-channel sandbox has always used.
async fn default_joinchat_send_message(
    state: State<Arc<Sandbox>>,
    reader: Extension<BodyReader>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    joinchat_send_message(state, Path(DEFAULT_CHANNEL.to_owned()), reader, headers, body).await
}

async fn default_bonychat_webhook(
    state: State<Arc<Sandbox>>,
    reader: Extension<BodyReader>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    bonychat_webhook(state, Path(DEFAULT_CHANNEL.to_owned()), reader, headers, body).await
}

async fn default_joinchat_requests(state: State<Arc<Sandbox>>) -> Result<Response, ApiError> {
    joinchat_requests(state, Path(DEFAULT_CHANNEL.to_owned())).await
}

async fn default_bonychat_events(state: State<Arc<Sandbox>>) -> Result<Response, ApiError> {
    bonychat_events(state, Path(DEFAULT_CHANNEL.to_owned())).await
}

/// JoinChat's `send_message`: checks `x-joinchat-signature` over the raw body and answers in
/// JoinChat's shapes (`{"success":…}`, errors in `errors.msg`). A body containing
/// [`REJECT_MARKER`] is refused with 400.
async fn joinchat_send_message(
    State(sandbox): State<Arc<Sandbox>>,
    Path(channel): Path<String>,
    Extension(reader): Extension<BodyReader>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let sandbox = sandbox.of(&channel)?;
    let body = reader.read(body, BODY_LIMIT).await?;
    let bytes = &body.bytes;
    let expected = joinchat_signature(sandbox.joinchat_secret.expose().as_bytes(), bytes);
    let presented = headers.get("x-joinchat-signature").map(|v| v.as_bytes()).unwrap_or_default();
    let signature_valid: bool = presented.ct_eq(expected.as_bytes()).into();

    let (status, answer) = if !signature_valid {
        (StatusCode::UNAUTHORIZED, json!({"success": false, "errors": {"msg": "signature mismatch"}}))
    } else if contains(bytes, REJECT_MARKER.as_bytes()) {
        let msg = format!("refused by the sandbox: the request contains {REJECT_MARKER}");
        (StatusCode::BAD_REQUEST, json!({"success": false, "errors": {"msg": msg}}))
    } else {
        // Only a signed body is parsed whole: it comes from the relay, and is small.
        let recipient =
            as_json(bytes)["recipient"].as_object().and_then(|r| r.values().next()).cloned().unwrap_or(Value::Null);
        (StatusCode::OK, json!({"success": true, "recipient_id": recipient}))
    };
    let mut kept_headers = json!({
        "content-type": header_text(&headers, header::CONTENT_TYPE.as_str()),
        "x-joinchat-signature": header_text(&headers, "x-joinchat-signature"),
    });
    with_trace(&mut kept_headers, &headers);
    sandbox.joinchat.keep(&json!({
        "receivedAt": now_millis(),
        "headers": kept_headers,
        "body": kept_body(bytes),
        "bodyBytes": bytes.len(),
        "signatureValid": signature_valid,
        "status": status.as_u16(),
    }));
    Ok((status, Json(answer)).into_response())
}

/// BonyChat's Webhook URL: checks `Authorization: Bearer <BONYCHAT_API_TOKEN>` in constant time.
async fn bonychat_webhook(
    State(sandbox): State<Arc<Sandbox>>,
    Path(channel): Path<String>,
    Extension(reader): Extension<BodyReader>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let sandbox = sandbox.of(&channel)?;
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
    let mut kept_headers = json!({
        "content-type": header_text(&headers, header::CONTENT_TYPE.as_str()),
        "authorization": authorization.map(|shown| cut(&shown, KEPT_HEADER_BYTES)),
    });
    with_trace(&mut kept_headers, &headers);
    sandbox.bonychat.keep(&json!({
        "receivedAt": now_millis(),
        "headers": kept_headers,
        "body": kept_body(bytes),
        "bodyBytes": bytes.len(),
        "tokenValid": token_valid,
        "status": status.as_u16(),
    }));
    Ok((status, Json(answer)).into_response())
}

async fn joinchat_requests(
    State(sandbox): State<Arc<Sandbox>>,
    Path(channel): Path<String>,
) -> Result<Response, ApiError> {
    Ok(sandbox.of(&channel)?.joinchat.serve("requests"))
}

async fn bonychat_events(
    State(sandbox): State<Arc<Sandbox>>,
    Path(channel): Path<String>,
) -> Result<Response, ApiError> {
    Ok(sandbox.of(&channel)?.bonychat.serve("events"))
}

/// The body as JSON, or as text when it is not JSON (a stand-in shows what it got either way).
fn as_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// What an entry keeps of a body: [`as_json`] up to [`KEPT_BODY_BYTES`]; beyond, the start of
/// it as text and how big it was (a cut JSON body no longer parses).
fn kept_body(bytes: &[u8]) -> Value {
    if bytes.len() <= KEPT_BODY_BYTES {
        return as_json(bytes);
    }
    Value::String(format!(
        "{}… [truncated: {} bytes received, the first {KEPT_BODY_BYTES} kept]",
        cut_utf8(&bytes[..KEPT_BODY_BYTES]),
        bytes.len()
    ))
}

/// Adds the `traceparent` and `tracestate` a request carried (SPEC §6), those it carried: an
/// operator trying traces in the sandbox sees what JoinChat and BonyChat would get.
fn with_trace(kept: &mut Value, headers: &HeaderMap) {
    for name in [crate::traces::TRACEPARENT, crate::traces::TRACESTATE] {
        if let Some(value) = header_text(headers, name) {
            kept[name] = Value::String(value);
        }
    }
}

fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| cut(&String::from_utf8_lossy(v.as_bytes()), KEPT_HEADER_BYTES))
}

/// `text` cut to at most `max` bytes, at a character boundary, `…` marking a cut.
fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    format!("{}…", cut_utf8(&text.as_bytes()[..max]))
}

/// `bytes` as text, without the partial character a cut may have left at its end.
fn cut_utf8(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.into(),
        Err(e) if e.error_len().is_none() => String::from_utf8_lossy(&bytes[..e.valid_up_to()]),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn served(received: &Received) -> Vec<Value> {
        let body = axum::body::to_bytes(received.serve("entries").into_body(), usize::MAX).await.unwrap();
        let served: Value = serde_json::from_slice(&body).unwrap();
        served["entries"].as_array().unwrap().clone()
    }

    #[tokio::test]
    async fn a_stand_in_keeps_only_the_latest_requests() {
        let received = Received::default();

        for n in 0..KEPT + 50 {
            received.keep(&json!(n));
        }

        let kept = served(&received).await;
        assert_eq!(kept.len(), KEPT);
        assert_eq!(kept[0], json!(50), "the oldest go first");
        assert_eq!(kept[KEPT - 1], json!(KEPT + 49));
    }

    #[tokio::test]
    async fn a_stand_in_keeps_at_most_its_byte_budget_of_the_latest_requests() {
        let received = Received::default();
        let big = |n: usize| json!({"n": n, "body": kept_body(&vec![b'x'; 1024 * 1024])});

        for n in 0..KEPT {
            received.keep(&big(n));
        }

        let kept = served(&received).await;
        let bytes: usize = kept.iter().map(|entry| entry.to_string().len()).sum();
        assert!(bytes <= KEPT_BYTES, "{bytes} bytes kept");
        assert!(kept.len() >= KEPT_BYTES / (KEPT_BODY_BYTES + 200), "as many as fit: {}", kept.len());
        assert_eq!(kept.last().unwrap()["n"], KEPT - 1, "the newest stays");
    }

    #[test]
    fn a_body_past_the_cap_is_kept_cut_and_says_how_big_it_was() {
        let small = json!({"text": "é".repeat(100)}).to_string();
        assert_eq!(kept_body(small.as_bytes()), serde_json::from_str::<Value>(&small).unwrap());

        // A two-byte character straddles the cut.
        let big = format!("x{}", "é".repeat(KEPT_BODY_BYTES));
        let Value::String(kept) = kept_body(big.as_bytes()) else { panic!("kept as text") };
        assert!(kept.len() < KEPT_BODY_BYTES + 100, "{}", kept.len());
        assert!(kept.starts_with("xéé"), "the start is kept");
        assert!(!kept.contains('\u{fffd}'), "no broken character at the cut");
        assert!(
            kept.ends_with(&format!("… [truncated: {} bytes received, the first {KEPT_BODY_BYTES} kept]", big.len()))
        );
    }

    #[test]
    fn the_reject_marker_is_found_anywhere_in_the_body() {
        assert!(contains(br#"{"text":"please #reject"}"#, REJECT_MARKER.as_bytes()));
        assert!(!contains(br#"{"text":"reject"}"#, REJECT_MARKER.as_bytes()));
        assert!(!contains(b"", REJECT_MARKER.as_bytes()));
    }
}
