//! The accept loop: HTTP/1.1 and HTTP/2 (prior knowledge) on one listener, with the limits a
//! public port needs against slow or hostile clients. The metrics listener runs the same loop
//! with limits of its own ([`ConnectionLimits`]).
//!
//! `axum::serve` offers none of these knobs, so connections are served with hyper directly:
//! - at most `max_connections` at once, shared fairly between peers (a peer is a source IPv4
//!   address, or an IPv6 /64: one host holds a whole /64). The loop accepts without pause and
//!   keeps a registry of its connections: peer, order of arrival, whether the client has sent a
//!   byte yet (`Heard`), and whether a request is in progress. A connection that arrives when
//!   the listener is full makes room, in this order:
//!   1. the oldest *silent* connection (its first read found nothing, and nothing came since)
//!      of the peer holding the most connections, the newcomer counted, is closed. A flood of
//!      sockets that connect and say nothing thus churns through its own connections instead
//!      of holding the cap while everyone else waits in the kernel's backlog, as a permit taken
//!      before `accept` did. A connection not read yet is not silent: under a flood the loop
//!      accepts many before their tasks first run, and a client sharing the flood's address
//!      must get that first read before it can be taken for part of it;
//!   2. with nothing silent, a newcomer whose peer already holds its fair share (the cap
//!      divided by the number of peers, the newcomer's included, at least 1) is closed at once;
//!   3. otherwise the oldest *idle* connection (has sent something, no request in progress)
//!      of a peer holding more than its fair share is closed: one client keeping idle
//!      keep-alive or half-sent connections cannot shut the others out until its timeouts run
//!      out;
//!   4. otherwise (the connections of the peers above their share are all answering a request
//!      or not read yet) the newcomer is closed at once.
//!
//!   A connection with a request in progress is never closed to make room. Sockets stay
//!   bounded: the newcomer is always either admitted in a victim's place or dropped, and
//!   `fit_to_descriptor_limit` keeps the cap inside the open-file limit. Each closing counts in
//!   `bonychat_relay_connections_evicted_total{listener,reason}`; a warning names the peer at
//!   most once per `PRESSURE_LOG_INTERVAL`, with the count of those not logged;
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
//! Behind a proxy or load balancer every connection comes from its address: the fair share
//! then covers the proxy as a whole, while silent connections are still closed first.
//!
//! What hyper itself still answers without a JSON body: an unparseable request line or header
//! (400), a head larger than [`H1_MAX_BUF`] or with more than [`H1_MAX_HEADERS`] headers (431),
//! and HTTP/2 header blocks beyond [`H2_MAX_HEADER_LIST`] (431 from the h2 crate, then the
//! stream is reset). Heads under those limits reach the router, whose middleware answers 414
//! and 431 in the JSON shape.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::ServerLimits;
use crate::monitoring;

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
/// A flood closes thousands of connections a second: one warning per interval says it is
/// going on without drowning the log.
const PRESSURE_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What one listener allows. The public port's come from the configuration
/// ([`ConnectionLimits::public`]); the metrics listener sets tighter ones of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Names the listener in logs and in the `listener` label of the evictions metric.
    pub listener: &'static str,
    /// Connections open at once; lowered at start to fit the open-file limit.
    pub max_connections: usize,
    /// A request head must arrive within it; a connection that sent none by then is closed.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress for this long is shut down.
    pub idle_timeout: Duration,
}

impl ConnectionLimits {
    /// The public port's limits: `RELAY_MAX_CONNECTIONS`, `RELAY_HEADER_READ_TIMEOUT_MS` and
    /// `RELAY_IDLE_TIMEOUT_SECS`.
    pub fn public(limits: &ServerLimits) -> Self {
        Self {
            listener: "public",
            max_connections: limits.max_connections,
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
        }
    }

    /// The metrics listener's: the public port's idle timeout, but few connections (scrapers
    /// are few) and a short head timeout (Prometheus sends its request as soon as it has
    /// connected), so idle sockets cannot keep Prometheus out of a port a container publishes.
    pub fn metrics(limits: &ServerLimits) -> Self {
        const MAX_SCRAPE_CONNECTIONS: usize = 16;
        const SCRAPE_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
        Self {
            listener: "metrics",
            max_connections: limits.max_connections.min(MAX_SCRAPE_CONNECTIONS),
            header_read_timeout: limits.header_read_timeout.min(SCRAPE_HEADER_READ_TIMEOUT),
            idle_timeout: limits.idle_timeout,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` is cancelled; then stops accepting, lets every
/// connection finish its requests in progress, and returns once all are closed. The caller
/// bounds that wait; dropping this future closes the connections that are left.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let max_connections = fit_to_descriptor_limit(limits.max_connections, descriptor_limit());
    match listener.local_addr() {
        Ok(addr) => tracing::info!(listener = limits.listener, %addr, max_connections, "accepting connections"),
        Err(_) => tracing::info!(listener = limits.listener, max_connections, "accepting connections"),
    }
    let builder = Arc::new(builder(&limits));
    let limits = Arc::new(limits);
    let mut tasks = JoinSet::new();
    let mut registry = Registry::default();
    let mut pressure = PressureLog::new(limits.listener);

    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            // Ahead of `accept`: a connection that ended frees its slot before the next
            // newcomer is judged, so nobody is closed for room that is already there.
            Some(ended) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                registry.remove(match ended {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                });
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let peer = peer_of(addr);
                    if registry.len() >= max_connections {
                        let closed = registry.make_room(peer, max_connections);
                        pressure.record(&closed);
                        if closed.reason.closes_newcomer() {
                            continue;
                        }
                    }
                    let _ = stream.set_nodelay(true);
                    let heard = Arc::new(Hearing::default());
                    let (requests, watch_requests) = watch::channel(Requests::default());
                    let task = tasks.spawn(serve_connection(
                        Heard { stream, heard: Arc::clone(&heard) },
                        requests,
                        router.clone(),
                        Arc::clone(&builder),
                        Arc::clone(&limits),
                        shutdown.clone(),
                    ));
                    registry.insert(task, peer, heard, watch_requests);
                    if registry.len() >= max_connections {
                        // The next newcomer will need a victim: let this one first read what
                        // its client sent, or a flood would leave nothing but unread
                        // connections to choose from, and every newcomer would be refused.
                        tokio::task::yield_now().await;
                    }
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
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Whom a connection counts against: its source address, and for IPv6 its /64, since one
/// host or subscriber is given a whole /64 and could otherwise take every slot alone.
fn peer_of(addr: SocketAddr) -> IpAddr {
    match addr.ip().to_canonical() {
        IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from(u128::from(ip) & !u128::from(u64::MAX))),
        ip @ IpAddr::V4(_) => ip,
    }
}

/// The live connections of one listener, known well enough to choose whom to close when it
/// is full. Only the accept loop touches it. A flood calls [`Registry::make_room`] for every
/// connection, so the counts per peer are kept up to date rather than counted each time, and
/// the choice allocates nothing.
#[derive(Default)]
struct Registry {
    live: HashMap<tokio::task::Id, Connection>,
    /// Connections per peer, each count shared with that peer's connections.
    held: HashMap<IpAddr, Arc<AtomicUsize>>,
    arrivals: u64,
}

struct Connection {
    peer: IpAddr,
    held: Arc<AtomicUsize>,
    /// Order of arrival: lower is older.
    arrival: u64,
    heard: Arc<Hearing>,
    requests: watch::Receiver<Requests>,
    task: AbortHandle,
}

impl Registry {
    fn len(&self) -> usize {
        self.live.len()
    }

    fn insert(&mut self, task: AbortHandle, peer: IpAddr, heard: Arc<Hearing>, requests: watch::Receiver<Requests>) {
        let held = Arc::clone(self.held.entry(peer).or_default());
        held.fetch_add(1, Ordering::Relaxed);
        self.arrivals += 1;
        self.live.insert(task.id(), Connection { peer, held, arrival: self.arrivals, heard, requests, task });
    }

    /// Forgets a connection whose task ended (or that is closed to make room).
    fn remove(&mut self, id: tokio::task::Id) -> Option<Connection> {
        let connection = self.live.remove(&id)?;
        if connection.held.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.held.remove(&connection.peer);
        }
        Some(connection)
    }

    /// Closes a connection to admit one from `newcomer`, or says that the newcomer is the one
    /// to close; see the module doc for the order.
    fn make_room(&mut self, newcomer: IpAddr, max_connections: usize) -> Closed {
        let held = self.held.get(&newcomer).map_or(0, |held| held.load(Ordering::Relaxed));
        let newcomer = Newcomer { peer: newcomer, held, peers: self.held.len() + usize::from(held == 0) };
        let candidates = self.live.iter().map(|(id, connection)| Candidate {
            key: *id,
            peer: connection.peer,
            held: connection.held.load(Ordering::Relaxed),
            arrival: connection.arrival,
            activity: match connection.heard.0.load(Ordering::Relaxed) {
                Hearing::UNREAD => Activity::Unread,
                Hearing::SILENT => Activity::Silent,
                _ if connection.requests.borrow().in_progress > 0 => Activity::Busy,
                _ => Activity::Idle,
            },
        });
        match choose_victim(candidates, newcomer, max_connections) {
            Room::Evict(id, reason) => {
                let victim = self.remove(id).expect("the victim was chosen among the live connections");
                // The task drops its socket when the runtime next polls it, so the listener
                // is over its cap by at most the few victims not yet dropped.
                victim.task.abort();
                Closed { peer: victim.peer, reason }
            }
            Room::Refuse(reason) => Closed { peer: newcomer.peer, reason },
        }
    }
}

/// What the victim choice needs to know of one live connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate<K> {
    key: K,
    peer: IpAddr,
    /// Connections its peer holds, itself included.
    held: usize,
    arrival: u64,
    activity: Activity,
}

/// The connection that finds the listener full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Newcomer {
    peer: IpAddr,
    /// Connections its peer already holds.
    held: usize,
    /// Peers holding connections, the newcomer's included.
    peers: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activity {
    /// Accepted, and not read yet: never closed to make room.
    Unread,
    /// Its first read found nothing, and nothing came since.
    Silent,
    /// Has sent something, and has no request in progress (between requests, or still
    /// sending its first head).
    Idle,
    /// A request in progress: never closed to make room.
    Busy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room<K> {
    /// Close this connection and admit the newcomer.
    Evict(K, Reason),
    /// Close the newcomer.
    Refuse(Reason),
}

/// Why a connection was closed under pressure: the `reason` label of the evictions metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Silent,
    Idle,
    OverFairShare,
    Busy,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Silent => "silent",
            Self::Idle => "idle",
            Self::OverFairShare => "over_fair_share",
            Self::Busy => "busy",
        }
    }

    fn closes_newcomer(self) -> bool {
        matches!(self, Self::OverFairShare | Self::Busy)
    }

    fn explanation(self) -> &'static str {
        match self {
            Self::Silent => "connection cap reached: closed the oldest connection that had sent nothing",
            Self::Idle => "connection cap reached: closed an idle connection of a peer above its fair share",
            Self::OverFairShare => "connection cap reached: refused a new connection of a peer holding its fair share",
            Self::Busy => "connection cap reached: refused a new connection, every other one is answering a request",
        }
    }
}

/// Chooses whom to close when `live` fills the listener's `cap` and `newcomer` arrives (the
/// order is the module doc's). A `Busy` or `Unread` connection is never chosen.
fn choose_victim<K: Copy>(live: impl Iterator<Item = Candidate<K>> + Clone, newcomer: Newcomer, cap: usize) -> Room<K> {
    let counting_newcomer = |c: &Candidate<K>| c.held + usize::from(c.peer == newcomer.peer);
    let silent = live.clone().filter(|c| c.activity == Activity::Silent);
    if let Some(victim) = silent.max_by_key(|c| (counting_newcomer(c), Reverse(c.arrival))) {
        return Room::Evict(victim.key, Reason::Silent);
    }

    let fair_share = (cap / newcomer.peers.max(1)).max(1);
    if newcomer.held >= fair_share {
        return Room::Refuse(Reason::OverFairShare);
    }
    live.filter(|c| c.activity == Activity::Idle && c.held > fair_share)
        .max_by_key(|c| (c.held, Reverse(c.arrival)))
        .map_or(Room::Refuse(Reason::Busy), |victim| Room::Evict(victim.key, Reason::Idle))
}

/// A connection closed to make room: whose, and why.
struct Closed {
    peer: IpAddr,
    reason: Reason,
}

/// Counts every closing, and logs at most one per [`PRESSURE_LOG_INTERVAL`].
struct PressureLog {
    listener: &'static str,
    last_logged: Option<Instant>,
    not_logged: u64,
}

impl PressureLog {
    fn new(listener: &'static str) -> Self {
        Self { listener, last_logged: None, not_logged: 0 }
    }

    fn record(&mut self, closed: &Closed) {
        monitoring::connection_evicted(self.listener, closed.reason.as_str());
        let now = Instant::now();
        if self.last_logged.is_some_and(|last| now.duration_since(last) < PRESSURE_LOG_INTERVAL) {
            self.not_logged += 1;
            return;
        }
        tracing::warn!(
            listener = self.listener,
            peer = %closed.peer,
            reason = closed.reason.as_str(),
            not_logged_since_last = self.not_logged,
            "{}",
            closed.reason.explanation()
        );
        self.last_logged = Some(now);
        self.not_logged = 0;
    }
}

/// Whether a client has sent anything: [`Hearing::UNREAD`] until its connection first reads
/// (its bytes may be waiting in the socket), then [`Hearing::SILENT`] or [`Hearing::HEARD`].
#[derive(Debug, Default)]
struct Hearing(AtomicU8);

impl Hearing {
    const UNREAD: u8 = 0;
    const SILENT: u8 = 1;
    const HEARD: u8 = 2;
}

/// A client's stream that keeps its connection's [`Hearing`] up to date: a full listener
/// closes the connections that never sent anything first.
struct Heard<S> {
    stream: S,
    heard: Arc<Hearing>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Heard<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let now = if buf.filled().len() > before { Hearing::HEARD } else { Hearing::SILENT };
        // Only ever forward: UNREAD to SILENT or HEARD, SILENT to HEARD.
        if self.heard.0.load(Ordering::Relaxed) < now {
            self.heard.0.store(now, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Heard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

fn builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
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

async fn serve_connection<S>(
    stream: S,
    in_progress: watch::Sender<Requests>,
    router: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    limits: Arc<ConnectionLimits>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch_requests = in_progress.subscribe();
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
    use proptest::prelude::*;

    use super::*;

    const FLOOD: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 9));
    const BONYCHAT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 51, 100, 7));
    const META: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 44));

    /// Connections numbered by arrival (the key is the arrival), from the given peers.
    fn live(connections: &[(IpAddr, Activity)]) -> Vec<Candidate<u64>> {
        let held = |peer: IpAddr| connections.iter().filter(|(p, _)| *p == peer).count();
        (1..)
            .zip(connections)
            .map(|(arrival, &(peer, activity))| Candidate { key: arrival, peer, held: held(peer), arrival, activity })
            .collect()
    }

    /// What the registry would tell [`choose_victim`] of a connection from `peer` finding `full`.
    fn choose(full: &[Candidate<u64>], peer: IpAddr, cap: usize) -> Room<u64> {
        let held = full.iter().filter(|c| c.peer == peer).count();
        let mut peers: Vec<IpAddr> = full.iter().map(|c| c.peer).chain([peer]).collect();
        peers.sort_unstable();
        peers.dedup();
        choose_victim(full.iter().copied(), Newcomer { peer, held, peers: peers.len() }, cap)
    }

    #[test]
    fn the_oldest_silent_connection_of_the_peer_holding_the_most_makes_room() {
        use Activity::{Busy, Idle, Silent};
        let full = live(&[(BONYCHAT, Busy), (FLOOD, Idle), (META, Silent), (FLOOD, Silent), (FLOOD, Silent)]);

        assert_eq!(choose(&full, BONYCHAT, 5), Room::Evict(4, Reason::Silent), "the flood's oldest silent one");
        assert_eq!(choose(&full, FLOOD, 5), Room::Evict(4, Reason::Silent), "the flood churns through its own");

        // The newcomer counts for its peer: Meta's third connection outnumbers the flood's two.
        let full = live(&[(META, Busy), (META, Silent), (FLOOD, Silent), (FLOOD, Silent)]);
        assert_eq!(choose(&full, META, 4), Room::Evict(2, Reason::Silent));
        assert_eq!(choose(&full, BONYCHAT, 4), Room::Evict(2, Reason::Silent), "peers tied: the oldest");
    }

    #[test]
    fn with_nothing_silent_a_peer_at_its_fair_share_is_refused_and_one_under_it_takes_an_idle_slot() {
        use Activity::{Busy, Idle};
        let full = live(&[(FLOOD, Busy), (FLOOD, Idle), (FLOOD, Idle), (BONYCHAT, Idle)]);

        // Two peers and the newcomer's share of a cap of 4 is 2: the flood holds 3, BonyChat 1.
        assert_eq!(choose(&full, FLOOD, 4), Room::Refuse(Reason::OverFairShare));
        assert_eq!(choose(&full, BONYCHAT, 4), Room::Evict(2, Reason::Idle), "the flood's oldest idle one");
        // Meta is a third peer: a share of 1, which only the flood exceeds.
        assert_eq!(choose(&full, META, 4), Room::Evict(2, Reason::Idle));
        // Nobody holds more than its share: nothing is taken from anyone.
        let shared = live(&[(FLOOD, Idle), (FLOOD, Idle), (BONYCHAT, Idle), (BONYCHAT, Idle)]);
        assert_eq!(choose(&shared, FLOOD, 4), Room::Refuse(Reason::OverFairShare));
        assert_eq!(choose(&shared, META, 4), Room::Evict(1, Reason::Idle), "a share of 1 each");
    }

    #[test]
    fn a_connection_with_a_request_in_progress_or_not_read_yet_is_never_closed_to_make_room() {
        let busy = live(&[(FLOOD, Activity::Busy), (FLOOD, Activity::Unread), (FLOOD, Activity::Busy)]);

        assert_eq!(choose(&busy, BONYCHAT, 3), Room::Refuse(Reason::Busy));
        assert_eq!(choose(&busy, FLOOD, 3), Room::Refuse(Reason::OverFairShare));
        // Not read yet, though older than a silent one: it may have a request waiting.
        let full = live(&[(FLOOD, Activity::Unread), (FLOOD, Activity::Silent)]);
        assert_eq!(choose(&full, FLOOD, 2), Room::Evict(2, Reason::Silent));
    }

    fn arbitrary_live() -> impl Strategy<Value = (Vec<Candidate<u64>>, IpAddr)> {
        let peer = prop::sample::select(vec![FLOOD, BONYCHAT, META]);
        let activity = prop::sample::select(vec![Activity::Unread, Activity::Silent, Activity::Idle, Activity::Busy]);
        (prop::collection::vec((peer.clone(), activity), 1..40), peer)
            .prop_map(|(connections, newcomer)| (live(&connections), newcomer))
    }

    proptest! {
        #[test]
        fn silent_connections_go_first_and_busy_or_unread_ones_never((full, newcomer) in arbitrary_live()) {
            let silent = full.iter().filter(|c| c.activity == Activity::Silent).count();
            match choose(&full, newcomer, full.len()) {
                Room::Evict(key, reason) => {
                    let victim = full.iter().find(|c| c.key == key).unwrap();
                    prop_assert!(matches!(victim.activity, Activity::Silent | Activity::Idle));
                    prop_assert_eq!(victim.activity == Activity::Silent, silent > 0);
                    prop_assert_eq!(reason, if silent > 0 { Reason::Silent } else { Reason::Idle });
                }
                Room::Refuse(_) => prop_assert_eq!(silent, 0, "a newcomer is refused only when nothing is silent"),
            }
        }
    }

    #[test]
    fn a_peer_is_an_ipv4_address_or_an_ipv6_slash_64() {
        let peer = |addr: &str| peer_of(addr.parse().unwrap()).to_string();

        assert_eq!(peer("203.0.113.9:50000"), "203.0.113.9");
        assert_eq!(peer("[::ffff:203.0.113.9]:50000"), "203.0.113.9", "IPv4 on a dual-stack listener");
        assert_eq!(peer("[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443"), "2001:db8:1:2::");
        assert_eq!(peer("[2001:db8:1:2::1]:443"), peer("[2001:db8:1:2:ffff::9]:443"));
        assert_ne!(peer("[2001:db8:1:2::1]:443"), peer("[2001:db8:1:3::1]:443"));
    }

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
