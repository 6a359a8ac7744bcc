//! `/webhooks/messenger`: the Messenger Platform's subscription handshake and page events
//! (SPEC §4.1, §4.2).

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::limits::BodyReader;
use super::message::shown_name;
use super::{AppState, WEBHOOK_BODY_LIMIT};
use crate::config::DEFAULT_APP;
use crate::delivery::channels::{App, Channel, Directory};
use crate::domain::bonychat::StatusValue;
use crate::domain::inbound::{MessengerEvent, parse_routed};
use crate::error::ApiError;
use crate::signing::SignatureError;
use crate::store::{InboundBatch, InboundItem, InboundSummary};
use crate::traces::JobTrace;

#[derive(Debug, Deserialize)]
pub struct Handshake {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

/// `GET /webhooks/messenger`: the handshake of the app `default`.
pub async fn verify_default_subscription(
    State(state): State<AppState>,
    query: Result<Query<Handshake>, QueryRejection>,
) -> Result<Response, ApiError> {
    verify_subscription(&state, DEFAULT_APP, query)
}

/// `GET /webhooks/messenger/{app}`.
pub async fn verify_app_subscription(
    State(state): State<AppState>,
    app: Result<Path<String>, PathRejection>,
    query: Result<Query<Handshake>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(app) = app.map_err(|_| ApiError::NotFound)?;
    verify_subscription(&state, &app, query)
}

/// Echoes `hub.challenge` when `hub.verify_token` is the app's.
fn verify_subscription(
    state: &AppState,
    app: &str,
    query: Result<Query<Handshake>, QueryRejection>,
) -> Result<Response, ApiError> {
    let directory = state.channels.current();
    let app = directory.app(app).ok_or_else(|| unknown_app(&directory, app))?;
    let Query(handshake) = query.map_err(|e| ApiError::InvalidRequest(format!("query: {}", e.body_text())))?;
    let required =
        |value: Option<String>, name: &str| value.ok_or_else(|| ApiError::InvalidRequest(format!("{name}: required")));
    let mode = required(handshake.mode, "hub.mode")?;
    let verify_token = required(handshake.verify_token, "hub.verify_token")?;
    let challenge = required(handshake.challenge, "hub.challenge")?;

    if !app.verify_token.matches(verify_token.as_bytes()) {
        return Err(ApiError::Forbidden("hub.verify_token does not match the app's verify token".into()).warned(
            format!(
                "webhook subscription refused for app {}: hub.verify_token is not {}: type that value in the Meta \
                 app's webhook subscription form",
                app.name, app.settings.verify_token
            ),
        ));
    }
    if mode != "subscribe" {
        return Err(ApiError::Forbidden("hub.mode must be subscribe".into()));
    }
    tracing::info!(app = %app.name, "Messenger webhook subscription verified");
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], challenge).into_response())
}

/// A webhook for an app this relay does not serve: a 404, and a warning naming the apps it
/// serves, since the callback URL in the Meta app's settings is most likely wrong.
fn unknown_app(directory: &Directory, app: &str) -> ApiError {
    let mut apps: Vec<&str> = directory.app_names().collect();
    apps.sort_unstable();
    let shown = shown_name(app);
    let served = apps.iter().map(|name| callback_path(name)).collect::<Vec<_>>().join(", ");
    ApiError::NoSuchApp(shown.clone()).warned(format!(
        "webhook for app {shown}, which this relay does not serve: the callback URL in the Meta app's Webhooks \
         settings must be one of {served}"
    ))
}

fn callback_path(app: &str) -> String {
    if app == DEFAULT_APP { "/webhooks/messenger".to_owned() } else { format!("/webhooks/messenger/{app}") }
}

/// What the operator is told of a webhook refused for its signature: which check failed, and
/// what usually causes it.
fn signature_refusal(app: &App, error: SignatureError) -> String {
    let cause = match error {
        SignatureError::Missing => {
            "Meta signs every post: this one came from elsewhere, or a proxy dropped the header".to_owned()
        }
        SignatureError::WrongAlgorithm => {
            "Meta's X-Hub-Signature-256 is sha256=…: the sender signs as the older X-Hub-Signature does".to_owned()
        }
        SignatureError::Malformed => "a proxy or a sender other than Meta rewrote the header".to_owned(),
        SignatureError::Mismatch => {
            let settings = &app.settings;
            let with = match app.hub_signature.has_previous() {
                false => settings.app_secret.clone(),
                true => format!("{} (nor with {})", settings.app_secret, settings.app_secret_previous),
            };
            format!(
                "not signed with {with}: set it to the App Secret of the Meta app whose webhooks come here (App \
                 settings, Basic); a proxy that re-encodes or trims the body breaks the signature too"
            )
        }
    };
    format!("webhook refused for app {} ({} signature): {error}: {cause}", app.name, error.check())
}

/// `POST /webhooks/messenger`: the app `default`.
pub async fn receive_default_events(
    State(state): State<AppState>,
    Extension(reader): Extension<BodyReader>,
    Extension(trace): Extension<JobTrace>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    receive_events(&state, DEFAULT_APP, (reader, trace), headers, body).await
}

/// `POST /webhooks/messenger/{app}`.
pub async fn receive_app_events(
    State(state): State<AppState>,
    app: Result<Path<String>, PathRejection>,
    Extension(reader): Extension<BodyReader>,
    Extension(trace): Extension<JobTrace>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(app) = app.map_err(|_| ApiError::NotFound)?;
    receive_events(&state, &app, (reader, trace), headers, body).await
}

/// Checks the signature over the raw bytes with the app's secret, stores every event in its
/// Page's channel, then answers 200: forwarding to BonyChat happens afterwards, from the store.
///
/// Each channel's events are stored in a transaction of their own: when one channel cannot take
/// them (its queue is full), the others' are stored all the same and the answer is the error, so
/// Meta sends the batch again; what was stored is then recognised as a duplicate.
async fn receive_events(
    state: &AppState,
    app: &str,
    (reader, trace): (BodyReader, JobTrace),
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let directory = state.channels.current();
    let app = directory.app(app).ok_or_else(|| unknown_app(&directory, app))?;
    let body = reader.read(body, WEBHOOK_BODY_LIMIT).await?;
    let signature = headers.get("x-hub-signature-256").map(|v| v.as_bytes());
    let verified = app
        .hub_signature
        .verify(signature, body.bytes.clone())
        .map_err(|e| ApiError::InvalidSignature(e).warned(signature_refusal(app, e)))?;

    let now = state.store.now();
    let routed = parse_routed(&verified, |page| app.channel_of_page(page).cloned(), now)
        .map_err(|e| ApiError::InvalidPayload(e.0))?;
    for ignored in &routed.ignored {
        tracing::info!(app = %app.name, reason = %ignored.0, "webhook content acknowledged, not forwarded");
    }
    for page in &routed.unknown_pages {
        tracing::warn!(app = %app.name, page = %page, "webhook entry for a Page no channel of this app has; acknowledged, not forwarded");
    }
    let received = routed.events.len();

    // Per channel, in Messenger's order, channels in the order they first appear.
    let mut batches: Vec<(std::sync::Arc<Channel>, Vec<InboundItem>)> = Vec::new();
    for (channel, event) in routed.events {
        match batches.iter_mut().find(|(c, _)| c.name == channel.name) {
            Some((_, items)) => items.push(to_item(event)),
            None => batches.push((channel, vec![to_item(event)])),
        }
    }
    let mut total = InboundSummary::default();
    let mut refused = None;
    for (channel, items) in batches {
        let batch = InboundBatch {
            channel: channel.name.clone(),
            max_queued: channel.config.max_queued.inbound,
            items,
            now,
            trace_context: trace.0.clone(),
        };
        match state.store.enqueue_inbound(batch).await {
            Ok(summary) => {
                // Counted once stored: a refused batch is redelivered by Meta and would count twice.
                crate::monitoring::inbound_dropped(&channel.name, summary.duplicates, summary.own_echoes, 0);
                tracing::info!(
                    app = %app.name,
                    channel = %channel.name,
                    queued = summary.queued,
                    duplicates = summary.duplicates,
                    own_echoes = summary.own_echoes,
                    receipts = summary.receipts,
                    "webhook stored"
                );
                total.queued += summary.queued;
                total.duplicates += summary.duplicates;
                total.own_echoes += summary.own_echoes;
                total.receipts += summary.receipts;
            }
            Err(e) => {
                tracing::warn!(app = %app.name, channel = %channel.name, error = %e, "cannot store a channel's webhook events");
                refused.get_or_insert(e);
            }
        }
    }
    if let Some(e) = refused {
        return Err(ApiError::Store(e));
    }
    crate::monitoring::inbound_dropped("", 0, 0, routed.ignored.len());
    if !routed.unknown_pages.is_empty() {
        crate::monitoring::unknown_page_dropped(&app.name, routed.unknown_pages.len());
    }
    Ok(Json(json!({
        "received": received,
        "queued": total.queued,
        "duplicates": total.duplicates,
        "own_echoes": total.own_echoes,
        "receipts": total.receipts,
        "unknown_pages": routed.unknown_pages.len(),
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
