//! The one error type of the HTTP API and its JSON shape (SPEC §2):
//! `{"error": {"code": "<snake_case>", "message": "<human text>"}}`.
//!
//! Client errors say exactly what is wrong. Internal errors answer a generic message; their
//! detail travels in the response extensions to the request log, which writes it once.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::domain::outbound::RequestError;
use crate::signing::SignatureError;
use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    InvalidSignature(SignatureError),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    InvalidPayload(String),
    #[error("channelId does not match this relay's BonyChat channel")]
    UnknownChannel,
    /// A channel name in the path that is not served (SPEC §3.1): never configured, or removed.
    #[error("no channel {0} here")]
    NoSuchChannel(String),
    /// A Meta app name in the webhook path that is not served (SPEC §4).
    #[error("no Messenger app {0} here")]
    NoSuchApp(String),
    #[error("JoinChat rejected the message: {0}")]
    RejectedByJoinChat(String),
    #[error("no such endpoint")]
    NotFound,
    #[error("method not allowed on this endpoint")]
    MethodNotAllowed,
    #[error("the request took too long")]
    RequestTimeout,
    #[error("request URI is longer than {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("request headers are too large: {0}")]
    HeadersTooLarge(String),
    /// Too many request bodies in memory at once: nothing was read to the end or stored.
    #[error("the relay is busy reading other requests; try again")]
    Overloaded,
    /// The store could not take the work: nothing was accepted, so the caller should retry.
    #[error("{}", store_message(.0))]
    Store(StoreError),
    #[error("{0}")]
    NoSuchJob(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error")]
    Internal(String),
    /// `error`, answered as it is, with `detail` written to the request log as a warning: a
    /// refusal the operator has something to do about (a webhook whose signature fails, for an
    /// app the relay does not serve), which the caller's answer does not spell out.
    #[error("{error}")]
    Warned { error: Box<ApiError>, detail: String },
}

/// The detail of an internal error, for the request log only.
#[derive(Debug, Clone)]
pub struct InternalErrorDetail(pub String);

/// Why work was turned away (a store that cannot write, a full queue, a webhook whose signature
/// fails), for the request log only: logged as a warning, not an error.
#[derive(Debug, Clone)]
pub struct RefusalDetail(pub String);

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized | Self::InvalidSignature(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::InvalidPayload(_) | Self::InvalidRequest(_) | Self::UnknownChannel | Self::RejectedByJoinChat(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::NotFound | Self::NoSuchChannel(_) | Self::NoSuchApp(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NoSuchJob(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Warned { error, .. } => error.status(),
        }
    }

    /// This error, with `detail` for the request log's warning ([`ApiError::Warned`]).
    pub fn warned(self, detail: impl Into<String>) -> Self {
        Self::Warned { error: Box::new(self), detail: detail.into() }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::InvalidSignature(_) => "invalid_signature",
            Self::Forbidden(_) => "forbidden",
            Self::InvalidRequest(_) => "invalid_request",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::InvalidPayload(_) => "invalid_payload",
            Self::UnknownChannel | Self::NoSuchChannel(_) => "unknown_channel",
            Self::NoSuchApp(_) => "unknown_app",
            Self::RejectedByJoinChat(_) => "rejected_by_joinchat",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::RequestTimeout => "request_timeout",
            Self::Store(StoreError::Full { .. } | StoreError::ContactFull { .. }) => "queue_full",
            Self::UriTooLong { .. } => "uri_too_long",
            Self::HeadersTooLarge(_) => "headers_too_large",
            Self::Overloaded => "overloaded",
            Self::Store(_) => "store_unavailable",
            Self::NoSuchJob(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Internal(_) => "internal_error",
            Self::Warned { error, .. } => error.code(),
        }
    }
}

/// What a caller is told about a store that could not take its work. The store's own detail
/// (paths, SQLite errors) goes to the log, not to callers.
fn store_message(error: &StoreError) -> String {
    match error {
        StoreError::Full { .. } | StoreError::ContactFull { .. } => format!("{error}; nothing was stored"),
        _ => "the relay cannot store work right now; nothing was stored, try again".into(),
    }
}

impl From<RequestError> for ApiError {
    fn from(err: RequestError) -> Self {
        match err {
            RequestError::NotJson(detail) => Self::InvalidPayload(format!("body: not valid JSON ({detail})")),
            RequestError::UnknownChannel => Self::UnknownChannel,
            RequestError::Invalid(field) => Self::InvalidPayload(field.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Warned { error, detail } = self {
            let mut response = error.into_response();
            response.extensions_mut().insert(RefusalDetail(detail));
            return response;
        }
        let body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut response = (self.status(), Json(body)).into_response();
        match self {
            Self::Unauthorized => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Store(e) => {
                // Nothing was stored: the caller should come back, not give up.
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                response.extensions_mut().insert(RefusalDetail(e.to_string()));
            }
            Self::Overloaded => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Self::Internal(detail) => {
                response.extensions_mut().insert(InternalErrorDetail(detail));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn internal_errors_keep_their_detail_out_of_the_body() {
        let response = ApiError::Internal("database password rejected".into()).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(response.extensions().get::<InternalErrorDetail>().is_some());
        let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            json!({"error": {"code": "internal_error", "message": "internal error"}})
        );
    }
}
