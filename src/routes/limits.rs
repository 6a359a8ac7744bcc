//! Limits on what one request may hold of the relay. The connection-level limits live in
//! [`crate::server`].

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Longer URIs get 414: the relay's own routes need a few dozen characters, and the Messenger
/// handshake a few hundred.
pub const MAX_URI_LEN: usize = 8 * 1024;
/// More headers than this get 431.
pub const MAX_HEADERS: usize = 100;
/// Headers (names and values) larger than this in all get 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Answers 414 and 431 with the JSON error shape. hyper is configured to let heads somewhat
/// over these limits through (see [`crate::server`]) so that this is what clients normally see.
pub async fn head_limits(request: Request, next: Next) -> Response {
    let uri = request.uri();
    let uri_len = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.scheme_str().map_or(0, str::len);
    if uri_len > MAX_URI_LEN {
        return ApiError::UriTooLong { limit: MAX_URI_LEN }.into_response();
    }
    let headers = request.headers();
    if headers.len() > MAX_HEADERS {
        return ApiError::HeadersTooLarge(format!("more than {MAX_HEADERS} headers")).into_response();
    }
    let header_bytes: usize = headers.iter().map(|(name, value)| name.as_str().len() + value.len()).sum();
    if header_bytes > MAX_HEADER_BYTES {
        return ApiError::HeadersTooLarge(format!("headers larger than {MAX_HEADER_BYTES} bytes in all"))
            .into_response();
    }
    next.run(request).await
}
