//! The accept loop: HTTP/1.1 and HTTP/2 (prior knowledge) on one listener, with the limits a
//! public port needs against slow or hostile clients.
//!
//! `axum::serve` offers none of these knobs, so connections are served with hyper directly:
//! - at most `max_connections` at once: a permit is taken *before* `accept`, so extra clients
//!   wait in the kernel's backlog instead of costing a task, buffers and a descriptor each;
//! - a request head must arrive within `header_read_timeout` (hyper's HTTP/1 timer; hyper
//!   1.12 also starts it when a keep-alive connection goes idle, see `Conn::poll_read_head`
//!   and `State::idle`), and a connection that has not yet carried a request is closed after
//!   the same time whatever protocol it turns out to speak (the protocol sniffing of
//!   `auto::Builder` and the HTTP/2 preface have no timer of their own);
//! - a connection with no request in progress for `idle_timeout` is shut down gracefully
//!   (HTTP/2 clients can keep a connection alive forever by answering pings);
//! - small HTTP/2 flow-control windows and stream counts, so one connection cannot make the
//!   relay buffer much that no handler asked for.
//!
//! What hyper itself still answers without a JSON body: an unparseable request line or header
//! (400), a head larger than [`H1_MAX_BUF`] or with more than [`H1_MAX_HEADERS`] headers (431),
//! and HTTP/2 header blocks beyond [`H2_MAX_HEADER_LIST`] (431 from the h2 crate, then the
//! stream is reset). Heads under those limits reach the router, whose middleware answers 414
//! and 431 in the JSON shape.

use std::io;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::ServerLimits;

/// HTTP/1 read buffer: bounds the memory of one connection and the size of a request head.
/// Well above the 16 KiB the router accepts, so ordinary oversize gets a JSON 431.
pub const H1_MAX_BUF: usize = 64 * 1024;
/// Above the router's 100, for the same reason.
pub const H1_MAX_HEADERS: usize = 256;
/// HTTP/2 header block limit, above the router's 16 KiB.
pub const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams one HTTP/2 connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 64;
/// What an HTTP/2 client may send on one stream, and on the whole connection, before a
/// handler reads it: what the relay buffers without being asked to.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 256 * 1024;
/// A peer that does not answer a ping within this is gone.
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Descriptors kept free of client connections: the store, upstream connections, logs.
const DESCRIPTOR_RESERVE: u64 = 256;
/// After a failed `accept` (descriptors exhausted, mostly) retrying at once would spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `router` on `listener` until `shutdown` is cancelled; then stops accepting, lets every
/// connection finish its requests in progress, and returns once all are closed. The caller
/// bounds that wait; dropping this future closes the connections that are left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let max_connections = fit_to_descriptor_limit(limits.max_connections, descriptor_limit());
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, max_connections, "accepting connections"),
        Err(_) => tracing::info!(max_connections, "accepting connections"),
    }
    let permits = Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS)));
    let builder = Arc::new(builder(&limits));
    let limits = Arc::new(limits);
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept(&listener, &permits) => match accepted {
                Ok((stream, permit)) => {
                    connections.spawn(serve_connection(
                        stream,
                        permit,
                        router.clone(),
                        Arc::clone(&builder),
                        Arc::clone(&limits),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    // The server must outlive a burst of EMFILE or ECONNABORTED.
                    tracing::warn!(error = %e, "cannot accept a connection; retrying shortly");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Waits for a free connection slot, then for a client. Cancel-safe: dropped while waiting, it
/// neither loses a connection nor keeps the slot.
async fn accept(listener: &TcpListener, permits: &Arc<Semaphore>) -> io::Result<(TcpStream, OwnedSemaphorePermit)> {
    let permit = Arc::clone(permits).acquire_owned().await.expect("the connection semaphore is never closed");
    let (stream, _) = listener.accept().await?;
    Ok((stream, permit))
}

fn builder(limits: &ServerLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(H1_MAX_BUF)
        .max_headers(H1_MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .adaptive_window(false)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        .max_send_buf_size(H2_CONNECTION_WINDOW as usize)
        .keep_alive_interval(limits.idle_timeout / 2)
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT);
    builder
}

async fn serve_connection(
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    router: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Arc<ServerLimits>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (in_progress, watch_requests) = watch::channel(Requests::default());
    let in_progress = Arc::new(in_progress);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let request_started = RequestInProgress::start(Arc::clone(&in_progress));
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await;
            drop(request_started);
            response
        }
    });

    let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
    let mut watch_idle = watch_requests.clone();
    let mut idle = pin!(idle_for(&mut watch_idle, limits.header_read_timeout, limits.idle_timeout));
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        () = shutdown.cancelled() => {}
        () = &mut idle => {}
    }
    connection.as_mut().graceful_shutdown();
    // A client that ignores the HTTP/2 GOAWAY (or never acknowledges the ping that follows it)
    // would keep the connection open, so it is dropped once it has again had no request in
    // progress for a while. Requests in progress are never cut here.
    let mut watch_close = watch_requests;
    let mut last_call = pin!(idle_for(&mut watch_close, limits.header_read_timeout, limits.header_read_timeout));
    tokio::select! {
        _ = connection.as_mut() => {}
        () = &mut last_call => tracing::debug!("connection ignored its shutdown; closing it"),
    }
}

/// Resolves once the connection has had no request in progress for `before_first` (no request
/// yet) or `between` (after one), counted from the end of the last request.
async fn idle_for(requests: &mut watch::Receiver<Requests>, before_first: Duration, between: Duration) {
    loop {
        let now = *requests.borrow_and_update();
        if now.in_progress > 0 {
            if requests.changed().await.is_err() {
                // The service is gone, so the connection is ending on its own.
                return std::future::pending().await;
            }
            continue;
        }
        let limit = if now.started > 0 { between } else { before_first };
        tokio::select! {
            () = tokio::time::sleep(limit) => return,
            changed = requests.changed() => {
                if changed.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// The requests of one connection, for its idle timer.
#[derive(Debug, Clone, Copy, Default)]
struct Requests {
    in_progress: usize,
    started: u64,
}

/// Counts a request as in progress on its connection until dropped (answered or abandoned).
struct RequestInProgress(Arc<watch::Sender<Requests>>);

impl RequestInProgress {
    fn start(requests: Arc<watch::Sender<Requests>>) -> Self {
        requests.send_modify(|r| {
            r.in_progress += 1;
            r.started += 1;
        });
        Self(requests)
    }
}

impl Drop for RequestInProgress {
    fn drop(&mut self) {
        self.0.send_modify(|r| r.in_progress -= 1);
    }
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits` (Linux); `None` elsewhere
/// or when unlimited.
fn descriptor_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_descriptor_limit(&limits)
}

fn parse_descriptor_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|line| line.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files").split_whitespace().next()?.parse().ok()
}

/// Clamps the connection cap so that connections cannot take the descriptors the store and
/// the upstream clients need: running out of those fails stored work, not just a client.
fn fit_to_descriptor_limit(configured: usize, descriptor_limit: Option<u64>) -> usize {
    let Some(limit) = descriptor_limit else { return configured };
    let available = usize::try_from(limit.saturating_sub(DESCRIPTOR_RESERVE)).unwrap_or(usize::MAX).max(1);
    if configured > available {
        tracing::warn!(
            configured,
            descriptor_limit = limit,
            reserve = DESCRIPTOR_RESERVE,
            using = available,
            "RELAY_MAX_CONNECTIONS does not fit the open-file limit (ulimit -n); lowering it"
        );
        available
    } else {
        configured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units
Max processes             63416                63416                processes
Max open files            1024                 524288               files
Max locked memory         8388608              8388608              bytes
";

    #[test]
    fn the_soft_descriptor_limit_is_read() {
        assert_eq!(parse_descriptor_limit(LIMITS), Some(1024));
        assert_eq!(parse_descriptor_limit("Max open files unlimited unlimited files"), None);
        assert_eq!(parse_descriptor_limit(""), None);
    }

    #[test]
    fn the_connection_cap_leaves_descriptors_for_the_rest() {
        assert_eq!(fit_to_descriptor_limit(1024, Some(20_000)), 1024);
        assert_eq!(fit_to_descriptor_limit(1024, Some(1024)), 768);
        assert_eq!(fit_to_descriptor_limit(1024, Some(100)), 1);
        assert_eq!(fit_to_descriptor_limit(1024, None), 1024);
    }
}
