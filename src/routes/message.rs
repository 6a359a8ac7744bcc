//! `POST /message`: BonyChat hands over a message for a Messenger contact (SPEC §3, §5).
//!
//! The message is stored (on disk) before anything else; then, for up to `RELAY_SEND_WAIT_MS`,
//! the request takes the first attempt itself, in this replica: sent → 200, refused by
//! JoinChat → 400, anything else → 200, and the relay keeps trying (a `failed` receipt follows
//! if it gives up).

use axum::Json;
use axum::body::Body;
use axum::extract::{Extension, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use serde::Serialize;

use super::limits::BodyReader;
use super::{AppState, MESSAGE_BODY_LIMIT};
use crate::delivery::{FirstAttempt, new_outbound_job};
use crate::domain::outbound::OutboundRequest;
use crate::domain::text::truncate;
use crate::error::ApiError;
use crate::store::DEFAULT_CHANNEL;

#[derive(Debug, Serialize)]
pub struct Accepted {
    #[serde(rename = "mId")]
    m_id: String,
}

pub async fn post_message(
    State(state): State<AppState>,
    _: BonyChatCaller,
    Extension(reader): Extension<BodyReader>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, ApiError> {
    require_json(&headers)?;
    let body = reader.read(body, MESSAGE_BODY_LIMIT).await?;
    let request = OutboundRequest::parse(&body.bytes, &state.config.bonychat.channel_id)?;
    let now = state.store.now();
    let max_queued = state.config.store.intake.outbound;
    let job = new_outbound_job(&request, DEFAULT_CHANNEL, max_queued, state.config.joinchat.recipient_field, now);
    let (m_id, contact) = (job.m_id.clone(), job.contact.clone());

    let wait = state.config.delivery.send_wait;
    let first = (!wait.is_zero()).then(|| state.worker.first_claim(now, wait));
    let enqueued = state.store.enqueue_outbound(job, first).await.map_err(ApiError::Store)?;
    if wait.is_zero() {
        return Ok(Json(Accepted { m_id }));
    }
    match state.worker.first_attempt(DEFAULT_CHANNEL, &contact, enqueued, wait).await {
        FirstAttempt::Rejected(reason) => Err(ApiError::RejectedByJoinChat(reason)),
        FirstAttempt::Sent | FirstAttempt::Pending | FirstAttempt::Paced { .. } => Ok(Json(Accepted { m_id })),
    }
}

/// Proof that the request carries the channel's API token. Extracted before the body, so an
/// unauthenticated caller never gets its body read.
pub struct BonyChatCaller;

impl FromRequestParts<AppState> for BonyChatCaller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if state.bonychat_token.is_presented_in(&parts.headers) { Ok(Self) } else { Err(ApiError::Unauthorized) }
    }
}

/// How much of a refused `Content-Type` the answer quotes back: enough to recognise it.
const SHOWN_CONTENT_TYPE_MAX: usize = 100;

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(content_type) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::UnsupportedMediaType("Content-Type must be application/json (none given)".into()));
    };
    // Read lossily: a value with bytes past ASCII is still the caller's Content-Type, not a
    // missing one, and the answer should say what was refused.
    let content_type = String::from_utf8_lossy(content_type.as_bytes());
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if media_type.eq_ignore_ascii_case("application/json") {
        return Ok(());
    }
    let shown = truncate(content_type.trim(), SHOWN_CONTENT_TYPE_MAX);
    Err(ApiError::UnsupportedMediaType(format!("Content-Type must be application/json, not \"{shown}\"")))
}
