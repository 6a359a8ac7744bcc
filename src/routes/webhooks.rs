//! `/webhooks/messenger`: the Messenger Platform's subscription handshake and page events
//! (SPEC §4.1, §4.2).

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::limits::BodyReader;
use super::{AppState, WEBHOOK_BODY_LIMIT};
use crate::domain::bonychat::StatusValue;
use crate::domain::inbound::{MessengerEvent, parse_envelope};
use crate::error::ApiError;
use crate::store::{DEFAULT_CHANNEL, InboundBatch, InboundItem};

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
    let Query(handshake) = query.map_err(|e| ApiError::InvalidRequest(format!("query: {}", e.body_text())))?;
    let required =
        |value: Option<String>, name: &str| value.ok_or_else(|| ApiError::InvalidRequest(format!("{name}: required")));
    let mode = required(handshake.mode, "hub.mode")?;
    let verify_token = required(handshake.verify_token, "hub.verify_token")?;
    let challenge = required(handshake.challenge, "hub.challenge")?;

    if !state.verify_token.matches(verify_token.as_bytes()) {
        return Err(ApiError::Forbidden("hub.verify_token does not match MESSENGER_VERIFY_TOKEN".into()));
    }
    if mode != "subscribe" {
        return Err(ApiError::Forbidden("hub.mode must be subscribe".into()));
    }
    tracing::info!("Messenger webhook subscription verified");
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], challenge).into_response())
}

/// `POST`: checks the signature over the raw bytes, stores every event, then answers 200:
/// forwarding to BonyChat happens afterwards, from the store.
pub async fn receive_events(
    State(state): State<AppState>,
    Extension(reader): Extension<BodyReader>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = reader.read(body, WEBHOOK_BODY_LIMIT).await?;
    let signature = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
    let verified = state.hub_signature.verify(signature, body.bytes.clone()).map_err(ApiError::InvalidSignature)?;

    let now = state.store.now();
    let envelope =
        parse_envelope(&verified, &state.config.joinchat.page_id, now).map_err(|e| ApiError::InvalidPayload(e.0))?;
    for ignored in &envelope.ignored {
        tracing::info!(reason = %ignored.0, "webhook content acknowledged, not forwarded");
    }
    let received = envelope.events.len();
    let ignored = envelope.ignored.len();
    let batch = InboundBatch {
        channel: DEFAULT_CHANNEL.to_owned(),
        max_queued: state.config.store.intake.inbound,
        items: envelope.events.into_iter().map(to_item).collect(),
        now,
    };
    let summary = state.store.enqueue_inbound(batch).await.map_err(ApiError::Store)?;
    // Counted once stored: a refused batch is redelivered by Meta and would count twice.
    crate::monitoring::inbound_dropped(summary.duplicates, summary.own_echoes, ignored);
    tracing::info!(
        received,
        queued = summary.queued,
        duplicates = summary.duplicates,
        own_echoes = summary.own_echoes,
        receipts = summary.receipts,
        "webhook stored"
    );
    Ok(Json(json!({
        "received": received,
        "queued": summary.queued,
        "duplicates": summary.duplicates,
        "own_echoes": summary.own_echoes,
        "receipts": summary.receipts,
    })))
}

fn to_item(event: MessengerEvent) -> InboundItem {
    match event {
        MessengerEvent::Message(message) => InboundItem::Message {
            events: message.webhook_events(),
            echo_fingerprint: message.fingerprint,
            contact: message.contact,
        },
        MessengerEvent::Delivery { contact, watermark, timestamp } => {
            InboundItem::Watermark { contact, status: StatusValue::Delivered, watermark, timestamp }
        }
        MessengerEvent::Read { contact, watermark, timestamp } => {
            InboundItem::Watermark { contact, status: StatusValue::Read, watermark, timestamp }
        }
    }
}
