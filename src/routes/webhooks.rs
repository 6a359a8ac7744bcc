//! `/webhooks/messenger`: the Messenger Platform's subscription handshake and page events
//! (SPEC §4.1, §4.2).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, WEBHOOK_BODY_LIMIT};
use crate::domain::inbound::parse_envelope;
use crate::error::ApiError;

/// Meta gives up on a webhook call after 20 s; answer before that, and let Meta redeliver
/// what is still being forwarded (it is deduplicated).
const FORWARD_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
pub struct Handshake {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

/// `GET`: echoes `hub.challenge` when `hub.verify_token` is ours.
pub async fn verify_subscription(
    State(state): State<AppState>,
    query: Result<Query<Handshake>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(handshake) =
        query.map_err(|e| ApiError::InvalidRequest(format!("query: {}", e.body_text())))?;
    let required = |value: Option<String>, name: &str| {
        value.ok_or_else(|| ApiError::InvalidRequest(format!("{name}: required")))
    };
    let mode = required(handshake.mode, "hub.mode")?;
    let verify_token = required(handshake.verify_token, "hub.verify_token")?;
    let challenge = required(handshake.challenge, "hub.challenge")?;

    if !state.verify_token.matches(verify_token.as_bytes()) {
        return Err(ApiError::Forbidden(
            "hub.verify_token does not match MESSENGER_VERIFY_TOKEN".into(),
        ));
    }
    if mode != "subscribe" {
        return Err(ApiError::Forbidden("hub.mode must be subscribe".into()));
    }
    tracing::info!("Messenger webhook subscription verified");
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        challenge,
    )
        .into_response())
}

/// `POST`: checks the signature over the raw bytes, then forwards every event.
pub async fn receive_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body =
        body.map_err(|rejection| ApiError::from_body_rejection(rejection, WEBHOOK_BODY_LIMIT))?;
    let signature = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
    let verified = state
        .hub_signature
        .verify(signature, body)
        .map_err(ApiError::InvalidSignature)?;

    let envelope = parse_envelope(&verified, &state.config.joinchat.page_id, now_millis())
        .map_err(|e| ApiError::InvalidPayload(e.0))?;
    for ignored in &envelope.ignored {
        tracing::info!(reason = %ignored.0, "webhook content acknowledged, not forwarded");
    }
    let received = envelope.events.len();

    let report = tokio::time::timeout(FORWARD_DEADLINE, state.inbound.forward(envelope.events))
        .await
        .map_err(|_| {
            ApiError::UpstreamUnavailable(format!(
                "BonyChat is slow: still forwarding after {} s; Meta will redeliver",
                FORWARD_DEADLINE.as_secs()
            ))
        })?;
    if let Some(first) = report.failures.first() {
        return Err(ApiError::UpstreamUnavailable(format!(
            "BonyChat did not take {} event(s) of this batch: {first}",
            report.failures.len()
        )));
    }
    Ok(Json(json!({
        "received": received,
        "forwarded": report.forwarded,
        "duplicates": report.duplicates,
        "own_echoes": report.own_echoes,
    })))
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
