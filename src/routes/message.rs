//! `POST /message`: BonyChat hands over a message for a Messenger contact (SPEC §3, §5).
//!
//! The message is stored (on disk) before anything else; then, for up to `RELAY_SEND_WAIT_MS`,
//! the request takes the first attempt itself, in this replica: sent → 200, refused by
//! JoinChat → 400, anything else → 200, and the relay keeps trying (a `failed` receipt follows
//! if it gives up).

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, header};
use serde::Serialize;

use super::limits::BodyReader;
use super::{AppState, MESSAGE_BODY_LIMIT};
use crate::delivery::{FirstAttempt, new_outbound_job};
use crate::domain::channel::{DEFAULT_CHANNEL, is_channel_name};
use crate::domain::outbound::OutboundRequest;
use crate::domain::text::truncate;
use crate::error::ApiError;
use crate::telemetry::ServedChannel;
use crate::traces::JobTrace;

#[derive(Debug, Serialize)]
pub struct Accepted {
    #[serde(rename = "mId")]
    m_id: String,
}

/// `POST /message`: the channel `default` (SPEC §3.1).
pub async fn post_default_message(
    State(state): State<AppState>,
    Extension(reader): Extension<BodyReader>,
    Extension(served): Extension<ServedChannel>,
    Extension(trace): Extension<JobTrace>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, ApiError> {
    post_message(&state, DEFAULT_CHANNEL, Intake { reader, served, trace }, headers, body).await
}

/// `POST /channels/{channel}/message`.
pub async fn post_channel_message(
    State(state): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
    Extension(reader): Extension<BodyReader>,
    Extension(served): Extension<ServedChannel>,
    Extension(trace): Extension<JobTrace>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, ApiError> {
    let Path(channel) = channel.map_err(|_| ApiError::NotFound)?;
    post_message(&state, &channel, Intake { reader, served, trace }, headers, body).await
}

/// Stores the message for `channel`, then takes its first attempt. The channel is looked up, and
/// its token checked, before the body is read: an unknown or unauthenticated caller never gets
/// its body read. The directory current now serves the whole request, even across a reload.
async fn post_message(
    state: &AppState,
    channel: &str,
    Intake { reader, served, trace }: Intake,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Accepted>, ApiError> {
    let directory = state.channels.current();
    let Some(channel) = directory.channel(channel) else {
        return Err(ApiError::NoSuchChannel(shown_name(channel)));
    };
    if !channel.token.is_presented_in(&headers) {
        return Err(ApiError::Unauthorized);
    }
    served.set(&channel.name);
    require_json(&headers)?;
    let body = reader.read(body, MESSAGE_BODY_LIMIT).await?;
    let config = &channel.config;
    let request = OutboundRequest::parse(&body.bytes, &config.bonychat.channel_id)?;
    let now = state.store.now();
    let recipient_field = config.joinchat.recipient_field;
    let job = new_outbound_job(&channel.name, config.max_queued.outbound, &request, recipient_field, now, trace.0);
    let (m_id, contact) = (job.m_id.clone(), job.contact.clone());

    let wait = state.config.delivery.send_wait;
    let first = (!wait.is_zero()).then(|| state.worker.first_claim(now, wait));
    let enqueued = state.store.enqueue_outbound(job, first).await.map_err(ApiError::Store)?;
    if wait.is_zero() {
        return Ok(Json(Accepted { m_id }));
    }
    let share = crate::delivery::worker::share_of(directory.len());
    match state.worker.first_attempt(channel, share, &contact, enqueued, wait).await {
        FirstAttempt::Rejected(reason) => Err(ApiError::RejectedByJoinChat(reason)),
        FirstAttempt::Sent | FirstAttempt::Pending | FirstAttempt::Paced { .. } => Ok(Json(Accepted { m_id })),
    }
}

/// What the middleware gave the request: its body reader, where to say which channel it
/// served, and the trace context its job keeps.
struct Intake {
    reader: BodyReader,
    served: ServedChannel,
    trace: JobTrace,
}

/// A name from the path as an error may quote it: short, and only when it could be a name.
pub fn shown_name(raw: &str) -> String {
    if is_channel_name(raw) { raw.to_owned() } else { format!("{:?}", truncate(raw, 40)) }
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
