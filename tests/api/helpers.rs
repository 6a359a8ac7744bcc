//! The test harness: the real relay on a random port, and a real HTTP stand-in for JoinChat.
//!
//! The stand-in recomputes `x-joinchat-signature` over the raw bytes it received, with its own
//! HMAC code (not the relay's), and answers 401 to a bad signature as JoinChat would. It
//! records every request and answers from a script, so a test can make JoinChat fail, throttle
//! or hang. The values a stand-in takes can be changed while it runs, as an upstream's are when
//! its secret is rotated. Set `TEST_LOG=1` to see the relay's logs.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bonychat_relay::config::{Config, Env};
use bonychat_relay::startup::{Application, Reloader};
use bonychat_relay::store::{Job, JobState, Store};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub const CHANNEL_ID: &str = "gfd8g7fd89dgfd";
pub const API_TOKEN: &str = "aaaxczsadzxcasdacxzcasdaaaxczsadzxcasdacxzcasd";
pub const PAGE_ID: &str = "510249619162304";
pub const JOINCHAT_SECRET: &str = "joinchat-bot-private-key";
pub const APP_SECRET: &str = "e6af24be1d683c8c911949f897eea1f6";
pub const VERIFY_TOKEN: &str = "meatyhamhock";
pub const PSID: &str = "1066835436691078";

pub const PAGE_TOKEN: &str = "EAAGpage-access-token";

pub struct TestApp {
    pub addr: SocketAddr,
    /// `RELAY_METRICS_ADDR`, bound to a free port.
    pub metrics_addr: SocketAddr,
    pub http: reqwest::Client,
    pub joinchat: StandIn,
    pub bonychat: StandIn,
    pub graph: StandIn,
    pub store: Arc<dyn Store>,
    /// The variables the relay was started with, for a restart.
    pub vars: Vec<(String, String)>,
    /// The directory of the SQLite file; removed when the test ends.
    pub data_dir: Arc<TempDir>,
    /// What `SIGHUP` calls: re-reads the channels and every secret file.
    pub reloader: Reloader,
    stop: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
}

/// The relay with the test defaults.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// The relay with some variables changed from the test defaults.
pub async fn spawn_app_with(overrides: &[(&str, &str)]) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter("debug").with_test_writer().try_init();
    }
    let joinchat = StandIn::joinchat(JOINCHAT_SECRET).await;
    let bonychat = StandIn::bonychat(API_TOKEN).await;
    let graph = StandIn::graph(PAGE_TOKEN).await;
    let data_dir = Arc::new(tempfile::tempdir().expect("a temporary directory"));
    let mut vars = test_vars(&joinchat.url, data_dir.path());
    set(&mut vars, "BONYCHAT_WEBHOOK_URL", &bonychat.url);
    set(&mut vars, "MESSENGER_GRAPH_URL", &graph.url);
    for (key, value) in overrides {
        set(&mut vars, key, value);
    }
    start(vars, joinchat, bonychat, graph, data_dir).await
}

/// Sets `key` in `vars`, replacing any value it had.
pub fn set(vars: &mut Vec<(String, String)>, key: &str, value: &str) {
    vars.retain(|(k, _)| k != key);
    vars.push((key.to_owned(), value.to_owned()));
}

async fn start(
    vars: Vec<(String, String)>,
    joinchat: StandIn,
    bonychat: StandIn,
    graph: StandIn,
    data_dir: Arc<TempDir>,
) -> TestApp {
    let config = Config::from_env(&Env::from_pairs(vars.clone())).expect("test configuration is valid");
    let app = Application::build(config).await.expect("relay starts");
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr();
    let store = app.store();
    let reloader = app.reloader();
    let stop = CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(stop.clone()));
    TestApp {
        addr,
        metrics_addr,
        http: http_client(),
        joinchat,
        bonychat,
        graph,
        store,
        vars,
        data_dir,
        reloader,
        stop,
        server,
    }
}

/// Every variable a test relay starts with: real defaults except for addresses, timeouts and
/// retry delays, and a store in `data_dir`.
pub fn test_vars(joinchat_url: &str, data_dir: &std::path::Path) -> Vec<(String, String)> {
    let database_url = format!("sqlite://{}/relay.db", data_dir.display());
    [
        ("RELAY_ADDR", "127.0.0.1:0"),
        ("RELAY_METRICS_ADDR", "127.0.0.1:0"),
        ("BONYCHAT_CHANNEL_ID", CHANNEL_ID),
        ("BONYCHAT_API_TOKEN", API_TOKEN),
        ("BONYCHAT_WEBHOOK_URL", "http://127.0.0.1:9/bonychat-webhook"),
        ("JOINCHAT_API_URL", joinchat_url),
        ("JOINCHAT_PAGE_ID", PAGE_ID),
        ("JOINCHAT_API_SECRET", JOINCHAT_SECRET),
        ("JOINCHAT_TIMEOUT_MS", "1000"),
        ("JOINCHAT_CONNECT_TIMEOUT_MS", "500"),
        ("BONYCHAT_TIMEOUT_MS", "1000"),
        ("MESSENGER_GRAPH_TIMEOUT_MS", "300"),
        ("MESSENGER_APP_SECRET", APP_SECRET),
        ("MESSENGER_VERIFY_TOKEN", VERIFY_TOKEN),
        ("RELAY_SHUTDOWN_GRACE_SECS", "5"),
        ("RELAY_DATABASE_URL", &database_url),
        // Quick retries, so tests see a whole schedule in well under a second.
        ("RELAY_RETRY_JOINCHAT", "100ms,200ms,300ms"),
        ("RELAY_RETRY_BONYCHAT", "100ms,200ms,300ms"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `POST /message` as BonyChat sends it.
    pub async fn post_message(&self, body: &Value) -> reqwest::Response {
        self.http.post(self.url("/message")).bearer_auth(API_TOKEN).json(body).send().await.expect("relay answers")
    }

    /// Sends `message` to `contact_id` on the test channel and returns status and JSON answer.
    pub async fn send(&self, contact_id: &str, message: Value) -> (StatusCode, Value) {
        let body = serde_json::json!({"channelId": CHANNEL_ID, "contactId": contact_id, "message": message});
        let response = self.post_message(&body).await;
        let status = response.status();
        (status, response.json().await.expect("answer is JSON"))
    }

    /// `POST /webhooks/messenger` signed as Meta signs: HMAC-SHA256 of the raw bytes.
    pub async fn post_webhook(&self, body: impl AsRef<[u8]>) -> reqwest::Response {
        let body = body.as_ref().to_vec();
        let signature = hub_signature(APP_SECRET, &body);
        self.post_webhook_with(body, Some(&signature)).await
    }

    /// `POST /webhooks/messenger` with the given `X-Hub-Signature-256` header, or none.
    pub async fn post_webhook_with(&self, body: Vec<u8>, signature: Option<&str>) -> reqwest::Response {
        let mut request =
            self.http.post(self.url("/webhooks/messenger")).header("content-type", "application/json").body(body);
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        request.send().await.expect("relay answers")
    }

    /// Asks the relay to stop as SIGTERM would, and waits until it has.
    pub async fn stop(self) {
        self.stop.cancel();
        self.server.await.expect("server task").expect("clean shutdown");
    }

    /// Stops the relay and starts it again on the same store and stand-ins.
    pub async fn restart(self) -> Self {
        let Self { vars, joinchat, bonychat, graph, data_dir, stop, server, store, reloader, .. } = self;
        stop.cancel();
        server.await.expect("server task").expect("clean shutdown");
        // The store is held by one relay at a time: this one lets go of it (the reloader's
        // channels hold it too) before the next.
        drop((store, reloader));
        start(vars, joinchat, bonychat, graph, data_dir).await
    }

    /// Waits until no job is queued or in flight any more, then lets the stand-ins' last
    /// answers land: after this, what the stand-ins recorded is everything that will come.
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let queued = self.store.list(Some(JobState::Queued), None, 1).await.expect("store answers");
            if queued.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
                return;
            }
            assert!(Instant::now() < deadline, "jobs still queued: {queued:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every post BonyChat received once nothing is queued any more, each checked for the
    /// channel's Bearer token, a JSON body and this relay's `channelId`.
    pub async fn bonychat_posts(&self) -> Vec<Value> {
        self.settle().await;
        self.bonychat
            .received()
            .iter()
            .map(|r| {
                assert!(r.authentic, "BonyChat got a post without the channel's token");
                assert_eq!(r.content_type.as_deref(), Some("application/json"));
                let post = r.json();
                assert_eq!(post["channelId"], CHANNEL_ID);
                post
            })
            .collect()
    }

    /// Jobs in `state`, oldest first.
    pub async fn jobs(&self, state: JobState) -> Vec<Job> {
        let mut jobs = self.store.list(Some(state), None, 1000).await.expect("store answers");
        jobs.reverse();
        jobs
    }
}

/// `sha256=` and the lowercase hex HMAC-SHA256 of `body`, as Meta computes it.
pub fn hub_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// A plain HTTP client for tests. reqwest is built without a default TLS crypto provider;
/// installing ring here keeps tests independent of which client happens to be built first.
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Sends raw bytes to `addr` and returns everything the server answered before closing.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything: a failed write is fine.
    let _ = stream.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// A BonyChat text message, as `/message` takes it.
pub fn text(t: &str) -> Value {
    json!({"type": "text", "text": t})
}

/// A user's text message from `sender`, as Meta posts it (unsigned: see `post_webhook`).
pub fn webhook_message(sender: &str, mid: &str, text: &str) -> Vec<u8> {
    let body = json!({"object": "page", "entry": [{"id": PAGE_ID, "time": 1_700_000_000_000_i64, "messaging": [
        {"sender": {"id": sender}, "recipient": {"id": PAGE_ID}, "timestamp": 1_700_000_000_000_i64,
         "message": {"mid": mid, "text": text}}
    ]}]});
    serde_json::to_vec(&body).unwrap()
}

/// Asserts the SPEC §2 error shape and returns the message.
pub fn assert_error(status: StatusCode, body: &Value, expected_status: u16, expected_code: &str) -> String {
    assert_eq!(status.as_u16(), expected_status, "{body}");
    assert_eq!(body["error"]["code"], expected_code, "{body}");
    let message = body["error"]["message"].as_str().expect("error.message is a string");
    assert!(!message.is_empty());
    assert_eq!(body.as_object().unwrap().len(), 1, "only `error` at the top: {body}");
    message.to_owned()
}

/// What a stand-in received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path_and_query: String,
    pub body: Bytes,
    pub content_type: Option<String>,
    /// Whether the request passed the stand-in's check (signature, token).
    pub authentic: bool,
    /// The status the stand-in answered.
    pub answered: u16,
    /// The W3C `traceparent` and `tracestate` the request carried (SPEC §6).
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub at: Instant,
}

impl Received {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("bodies are UTF-8")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("bodies are JSON")
    }
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    body: String,
    retry_after: Option<String>,
    delay: Duration,
}

impl Reply {
    pub fn ok() -> Self {
        Self::status(200, r#"{"success":true,"recipient_id":"1066835436691078"}"#)
    }

    pub fn status(status: u16, body: &str) -> Self {
        Self { status, body: body.to_owned(), retry_after: None, delay: Duration::ZERO }
    }

    pub fn retry_after(mut self, value: &str) -> Self {
        self.retry_after = Some(value.to_owned());
        self
    }

    /// Answers only after `delay`: long enough, a timeout.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// How a stand-in tells an authentic request from a forged one, and what it answers to the latter.
#[derive(Clone, Copy)]
enum Check {
    /// JoinChat: `x-joinchat-signature` over the raw body.
    JoinChatSignature,
    /// BonyChat: `Authorization: Bearer <token>`.
    Bearer,
    /// Graph API: `access_token` in the query.
    AccessToken,
}

impl Check {
    /// Whether the request carries one of the values in `accepted`.
    fn passes(self, accepted: &[String], headers: &HeaderMap, query: &str, body: &[u8]) -> bool {
        let carries = |value: &String| match self {
            Self::JoinChatSignature => {
                let signature = headers.get("x-joinchat-signature").and_then(|v| v.to_str().ok());
                signature == Some(expected_signature(value, body).as_str())
            }
            Self::Bearer => {
                headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(format!("Bearer {value}").as_str())
            }
            Self::AccessToken => query.split('&').any(|pair| pair == format!("access_token={value}")),
        };
        accepted.iter().any(carries)
    }

    fn refusal(self) -> (StatusCode, &'static str) {
        match self {
            Self::JoinChatSignature => {
                (StatusCode::UNAUTHORIZED, r#"{"success":false,"errors":{"msg":"signature mismatch"}}"#)
            }
            Self::Bearer => (StatusCode::UNAUTHORIZED, r#"{"error":{"message":"401: UNAUTHORIZED"}}"#),
            Self::AccessToken => {
                (StatusCode::BAD_REQUEST, r#"{"error":{"message":"Invalid OAuth access token.","code":190}}"#)
            }
        }
    }
}

/// A real HTTP server standing in for an upstream: it checks what the real one would check,
/// records every request, and answers from a script (then with its default answer).
#[derive(Clone)]
pub struct StandIn {
    /// The URL to configure the relay with.
    pub url: String,
    state: Arc<StandInState>,
}

struct StandInState {
    check: Check,
    /// The secrets or tokens it takes now.
    accepted: Mutex<Vec<String>>,
    default_reply: Reply,
    /// Percentage of unscripted requests answered 503 at random.
    failure_percent: std::sync::atomic::AtomicU32,
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<Reply>>,
    arrivals: tokio::sync::Notify,
}

impl StandIn {
    pub async fn joinchat(secret: &str) -> Self {
        Self::start("/api/send_message", Check::JoinChatSignature, secret, Reply::ok()).await
    }

    pub async fn bonychat(token: &str) -> Self {
        Self::start("/custom/channel/webhook/", Check::Bearer, token, Reply::status(200, "")).await
    }

    /// The Graph API: the relay is configured with `url` as `MESSENGER_GRAPH_URL`.
    pub async fn graph(token: &str) -> Self {
        let profile = r#"{"first_name":"Peter","last_name":"Chang","profile_pic":"https://platform-lookaside.example/pic.jpg","locale":"en_US","timezone":-7,"id":"1066835436691078"}"#;
        Self::start("/v21.0", Check::AccessToken, token, Reply::status(200, profile)).await
    }

    async fn start(path: &str, check: Check, accepted: &str, default_reply: Reply) -> Self {
        let state = Arc::new(StandInState {
            check,
            accepted: Mutex::new(vec![accepted.to_owned()]),
            default_reply,
            failure_percent: std::sync::atomic::AtomicU32::new(0),
            received: Mutex::default(),
            script: Mutex::default(),
            arrivals: tokio::sync::Notify::new(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}{path}", listener.local_addr().unwrap());
        let app = axum::Router::new().fallback(receive).with_state(Arc::clone(&state));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { url, state }
    }

    /// From now on, takes these values only (a rotated secret: the new one, or both for a while).
    pub fn accept(&self, values: &[&str]) {
        *self.state.accepted.lock().unwrap() = values.iter().map(|v| (*v).to_owned()).collect();
    }

    /// Queues answers for the next requests; once the script runs out, the default answer.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.script.lock().unwrap().extend(replies);
    }

    /// Answers this percentage of unscripted requests with a 503, at random.
    pub fn fail_randomly(&self, percent: u32) {
        self.state.failure_percent.store(percent, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.received().iter().map(Received::json).collect()
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let notified = self.state.arrivals.notified();
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "the stand-in got {} requests, expected {n}",
                received.len()
            );
        }
    }
}

/// The stand-in's own signature check, written from the JoinChat documentation's PHP sample:
/// `base64_encode(hash_hmac('sha256', $params, API_SECRET, true))`.
pub fn expected_signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

async fn receive(
    State(state): State<Arc<StandInState>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = uri.query().unwrap_or("").to_owned();
    let accepted = state.accepted.lock().unwrap().clone();
    let authentic = state.check.passes(&accepted, &headers, &query, &body);
    let reply = if authentic {
        let scripted = state.script.lock().unwrap().pop_front();
        let failing = state.failure_percent.load(std::sync::atomic::Ordering::Relaxed);
        scripted.unwrap_or_else(|| {
            if fastrand::u32(0..100) < failing {
                Reply::status(503, "randomly unavailable")
            } else {
                state.default_reply.clone()
            }
        })
    } else {
        let (status, body) = state.check.refusal();
        Reply::status(status.as_u16(), body)
    };
    state.received.lock().unwrap().push(Received {
        path_and_query: uri.path_and_query().map(ToString::to_string).unwrap_or_default(),
        body,
        content_type: headers.get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned),
        authentic,
        answered: reply.status,
        traceparent: headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned),
        tracestate: headers.get("tracestate").and_then(|v| v.to_str().ok()).map(str::to_owned),
        at: Instant::now(),
    });
    state.arrivals.notify_waiters();

    tokio::time::sleep(reply.delay).await;
    let mut response = (StatusCode::from_u16(reply.status).unwrap(), reply.body).into_response();
    if let Some(retry_after) = reply.retry_after {
        response.headers_mut().insert("retry-after", retry_after.parse().unwrap());
    }
    response
}

/// An address that accepts connections and never answers a byte (an upstream or collector that
/// hangs); the sockets stay open until the test ends.
pub async fn hanging_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    addr
}

/// A second loopback address: Linux routes all of 127.0.0.0/8 to `lo`, so a client bound to
/// it is, to the relay, another peer than everything else a test sends from 127.0.0.1.
pub const OTHER_PEER: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

/// A client whose every request opens a new connection from `source`: each one goes through
/// the relay's `accept` and connection cap.
pub fn http_client_from(source: std::net::IpAddr) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().local_address(source).pool_max_idle_per_host(0).build().unwrap()
}

/// A TCP connection to `addr` from the address `source`.
pub async fn connect_from(source: std::net::IpAddr, addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(addr).await
}

/// Sockets that connect from 127.0.0.1 and never send a byte, each opened again as soon as
/// the relay closes it: the probe that held the relay's connection cap.
pub struct SilentFlood {
    connects: Arc<std::sync::atomic::AtomicU64>,
    closes: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
    sockets: tokio::task::JoinSet<()>,
}

impl SilentFlood {
    /// Starts `sockets` silent sockets against `addr` and waits until each has connected once.
    pub async fn start(addr: SocketAddr, sockets: usize) -> Self {
        let mut flood = Self {
            connects: Arc::default(),
            closes: Arc::default(),
            stop: CancellationToken::new(),
            sockets: tokio::task::JoinSet::new(),
        };
        for _ in 0..sockets {
            let (connects, closes, stop) = (Arc::clone(&flood.connects), Arc::clone(&flood.closes), flood.stop.clone());
            flood.sockets.spawn(async move {
                use std::sync::atomic::Ordering::Relaxed;
                use tokio::io::AsyncReadExt;
                while !stop.is_cancelled() {
                    let Ok(mut stream) = connect_from(std::net::Ipv4Addr::LOCALHOST.into(), addr).await else {
                        // Out of ports or a full backlog: the next attempt a moment later.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    connects.fetch_add(1, Relaxed);
                    let mut buf = [0_u8; 64];
                    tokio::select! {
                        _ = stream.read(&mut buf) => { closes.fetch_add(1, Relaxed); }
                        () = stop.cancelled() => {}
                    }
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while flood.connects() < sockets as u64 {
            assert!(Instant::now() < deadline, "only {} of {sockets} silent sockets connected", flood.connects());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        flood
    }

    /// How many times its sockets have connected.
    pub fn connects(&self) -> u64 {
        self.connects.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the flood and returns how many of its connections the relay closed.
    pub async fn stop(mut self) -> u64 {
        self.stop.cancel();
        while self.sockets.join_next().await.is_some() {}
        self.closes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Runs the test `test` of this binary in a child process, alone, with `marker` set so that the
/// child knows it is the one to run it: for tests that read process-wide counters, which other
/// relays in the process would move.
pub fn run_alone(test: &str, marker: &str) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(marker, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("1 passed"), "the test ran: {stdout}");
}
