//! `POST /message`: BonyChat hands over a message for a Messenger contact (SPEC §3).

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use serde::Serialize;

use super::{AppState, MESSAGE_BODY_LIMIT};
use crate::delivery::OutboundJob;
use crate::domain::outbound::OutboundRequest;
use crate::error::ApiError;

#[derive(Debug, Serialize)]
pub struct Accepted {
    #[serde(rename = "mId")]
    m_id: String,
}

pub async fn post_message(
    State(state): State<AppState>,
    _: BonyChatCaller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Accepted>, ApiError> {
    require_json(&headers)?;
    let body =
        body.map_err(|rejection| ApiError::from_body_rejection(rejection, MESSAGE_BODY_LIMIT))?;
    let request = OutboundRequest::parse(&body, &state.config.bonychat.channel_id)?;

    let job = OutboundJob::new(&request, state.config.joinchat.recipient_field);
    let m_id = job.m_id.clone();
    state.outbound.deliver(job).await?;
    Ok(Json(Accepted { m_id }))
}

/// Proof that the request carries the channel's API token. Extracted before the body, so an
/// unauthenticated caller never gets its body read.
pub struct BonyChatCaller;

impl FromRequestParts<AppState> for BonyChatCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if state.bonychat_token.is_presented_in(&parts.headers) {
            Ok(Self)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if media_type.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else if content_type.is_empty() {
        Err(ApiError::UnsupportedMediaType(
            "Content-Type must be application/json (none given)".into(),
        ))
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type must be application/json, not {content_type}"
        )))
    }
}
