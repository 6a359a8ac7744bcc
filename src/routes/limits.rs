//! Limits on what one request may hold of the relay: the size of its head, the time and memory
//! its body takes. The connection-level limits live in [`crate::server`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::ServerLimits;
use crate::error::ApiError;

/// Longer URIs get 414: the relay's own routes need a few dozen characters, and the Messenger
/// handshake a few hundred.
pub const MAX_URI_LEN: usize = 8 * 1024;
/// More headers than this get 431.
pub const MAX_HEADERS: usize = 100;
/// Headers (names and values) larger than this in all get 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long a body may wait for room in the shared byte budget before the request is turned
/// away: a short wait absorbs a burst, a long one would let the queue of waiters grow.
const BUDGET_WAIT: Duration = Duration::from_millis(500);

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

/// Reads request bodies under a deadline and a process-wide budget of bytes held in memory.
///
/// The budget is what stops many slow or unfinished bodies from adding up: each one is small
/// enough on its own, but a thousand connections times a megabyte is not.
#[derive(Clone)]
pub struct BodyReader {
    budget: Arc<Semaphore>,
    budget_size: usize,
    deadline: Duration,
}

/// A body read in full, with its share of the budget: held until this is dropped, because the
/// bytes stay in memory as long as the handler works with them.
pub struct ReadBody {
    pub bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

impl BodyReader {
    pub fn new(limits: &ServerLimits) -> Self {
        let budget = limits.max_body_bytes_in_flight.min(Semaphore::MAX_PERMITS);
        Self { budget: Arc::new(Semaphore::new(budget)), budget_size: budget, deadline: limits.body_read_timeout }
    }

    /// Reads `body` frame by frame: over `limit` → 413, not complete within the deadline →
    /// 408, no room in the budget for a moment → 503 `overloaded`.
    pub async fn read(&self, mut body: Body, limit: usize) -> Result<ReadBody, ApiError> {
        let deadline = Instant::now() + self.deadline;
        if usize::try_from(HttpBody::size_hint(&body).lower()).unwrap_or(usize::MAX) > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
        // Chunks are kept as they came, so the memory held while a body trickles in is the bytes
        // counted against the budget, not a growing buffer's spare capacity.
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut len = 0;
        let mut held: Option<OwnedSemaphorePermit> = None;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(ApiError::RequestTimeout),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(ApiError::InvalidPayload(format!("body: could not be read ({e})"))),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            if data.is_empty() {
                continue;
            }
            if len + data.len() > limit {
                return Err(ApiError::PayloadTooLarge { limit });
            }
            let permit = self.reserve(data.len(), deadline).await?;
            match &mut held {
                Some(held) => held.merge(permit),
                None => held = Some(permit),
            }
            len += data.len();
            chunks.push(data);
        }
        let bytes = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.swap_remove(0),
            _ => Bytes::from(chunks.concat()),
        };
        Ok(ReadBody { bytes, _budget: held })
    }

    async fn reserve(&self, len: usize, deadline: Instant) -> Result<OwnedSemaphorePermit, ApiError> {
        // A chunk larger than the whole budget could never be admitted, and waiting for it would
        // hold up every body queued behind it (the semaphore is fair). Chunks are at most
        // hyper's read buffer or an h2 frame, well under the smallest budget allowed.
        if len > self.budget_size {
            return Err(ApiError::Overloaded);
        }
        let Ok(len) = u32::try_from(len) else { return Err(ApiError::Overloaded) };
        let give_up = deadline.min(Instant::now() + BUDGET_WAIT);
        match tokio::time::timeout_at(give_up, Arc::clone(&self.budget).acquire_many_owned(len)).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(ApiError::Overloaded),
            Err(_) if give_up == deadline => Err(ApiError::RequestTimeout),
            Err(_) => Err(ApiError::Overloaded),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that arrives in the given pieces (popped from the end).
    struct Chunks(Vec<&'static str>);

    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop().map(|chunk| Ok(hyper::body::Frame::data(Bytes::from(chunk)))))
        }
    }

    fn reader(budget: usize, deadline: Duration) -> BodyReader {
        BodyReader { budget: Arc::new(Semaphore::new(budget)), budget_size: budget, deadline }
    }

    #[tokio::test]
    async fn a_body_holds_its_bytes_of_the_budget_until_dropped() {
        let reader = reader(100, Duration::from_secs(1));
        let body = reader.read(Body::from("x".repeat(60)), 64).await.unwrap();
        assert_eq!(body.bytes.len(), 60);
        assert_eq!(reader.budget.available_permits(), 40);
        drop(body);
        assert_eq!(reader.budget.available_permits(), 100);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_budget_turns_bodies_away_as_overload() {
        let reader = reader(100, Duration::from_secs(10));
        let _held = reader.read(Body::from("x".repeat(60)), 64).await.unwrap();
        let refused = reader.read(Body::from("y".repeat(60)), 64).await.err();
        assert_eq!(refused, Some(ApiError::Overloaded));
        assert_eq!(reader.budget.available_permits(), 40, "a refused body gives its share back");
    }

    #[tokio::test]
    async fn a_body_in_many_chunks_is_read_whole() {
        let reader = reader(1000, Duration::from_secs(1));
        let body = Body::new(Chunks(vec!["}", " 1", "{\"a\":"]));
        let read = reader.read(body, 64).await.unwrap();
        assert_eq!(read.bytes, "{\"a\": 1}");
        assert_eq!(reader.budget.available_permits(), 1000 - 8);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let reader = reader(1000, Duration::from_secs(1));
        let refused = reader.read(Body::from("x".repeat(65)), 64).await.err();
        assert_eq!(refused, Some(ApiError::PayloadTooLarge { limit: 64 }));
    }
}
