//! Slow and hostile clients: silent and half-sent connections, idling, the connection cap and
//! who gives way when it is reached, unfinished bodies over HTTP/1.1 and HTTP/2, oversized
//! heads and request ids.
//!
//! Every test runs the relay with small limits so that it finishes in seconds, and bounds each
//! wait, so a relay that never closes or never answers fails the test instead of hanging it.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use crate::helpers::{
    API_TOKEN, CHANNEL_ID, OTHER_PEER, PSID, Reply, SilentFlood, TestApp, assert_error, connect_from, http_client_from,
    spawn_app_with,
};

/// Reads until the server closes the connection (EOF or reset); `None` when it is still open
/// after `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0_u8; 4096];
    let closed = timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    closed.ok().map(|()| started.elapsed())
}

/// Reads until `needle` has arrived; panics when it has not within `limit`.
async fn read_until(stream: &mut TcpStream, needle: &str, limit: Duration) -> String {
    let mut seen = Vec::new();
    let mut buf = [0_u8; 4096];
    let read = timeout(limit, async {
        loop {
            let n = stream.read(&mut buf).await.expect("readable");
            assert!(n > 0, "closed before {needle:?}: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains(needle) {
                return;
            }
        }
    })
    .await;
    let seen = String::from_utf8_lossy(&seen).into_owned();
    assert!(read.is_ok(), "no {needle:?} within {limit:?}: {seen}");
    seen
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("the relay's port takes connections")
}

fn message_body(text: &str) -> Value {
    json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": {"type": "text", "text": text}})
}

async fn healthz_status(app: &TestApp) -> StatusCode {
    let answer = app.http.get(app.url("/healthz")).timeout(Duration::from_secs(3)).send().await;
    answer.expect("/healthz answers").status()
}

#[tokio::test]
async fn silent_and_half_sent_connections_do_not_keep_others_from_being_served() {
    let app = spawn_app_with(&[("RELAY_MAX_CONNECTIONS", "1000")]).await;
    let mut hostile = Vec::new();
    for _ in 0..300 {
        hostile.push(connect(app.addr).await);
    }
    for _ in 0..200 {
        let mut stream = connect(app.addr).await;
        stream.write_all(b"POST /message HTTP/1.1\r\nHost: relay\r\nContent-Type: appl").await.unwrap();
        hostile.push(stream);
    }

    let started = Instant::now();
    assert_eq!(healthz_status(&app).await, 200);
    let sent = app.http.post(app.url("/message")).bearer_auth(API_TOKEN).json(&message_body("still here"));
    let sent = sent.timeout(Duration::from_secs(5)).send().await.expect("/message answers");

    assert_eq!(sent.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(hostile);
    app.stop().await;
}

#[tokio::test]
async fn silent_and_half_sent_connections_are_closed_after_the_header_timeout() {
    let app = spawn_app_with(&[("RELAY_HEADER_READ_TIMEOUT_MS", "500")]).await;
    let mut silent = connect(app.addr).await;
    let mut half_sent = connect(app.addr).await;
    half_sent.write_all(b"GET /healthz HTTP/1.1\r\nHost: rel").await.unwrap();

    let silent_closed = closed_within(&mut silent, Duration::from_secs(5)).await;
    let half_sent_closed = closed_within(&mut half_sent, Duration::from_secs(5)).await;

    let silent_closed = silent_closed.expect("a silent connection is closed");
    assert!(silent_closed >= Duration::from_millis(300), "not before the timeout: {silent_closed:?}");
    assert!(half_sent_closed.is_some(), "a half-sent request head is closed");
    app.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let app = spawn_app_with(&[("RELAY_IDLE_TIMEOUT_SECS", "1"), ("RELAY_HEADER_READ_TIMEOUT_MS", "30000")]).await;

    // HTTP/1.1: one request, then nothing.
    let mut stream = connect(app.addr).await;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n").await.unwrap();
    let answer = read_until(&mut stream, r#"{"status":"ok"}"#, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let closed = closed_within(&mut stream, Duration::from_secs(5)).await.expect("HTTP/1.1 idle connection closed");
    assert!(closed >= Duration::from_millis(700), "not before the idle timeout: {closed:?}");

    // HTTP/2: the same, although the client would answer pings forever.
    let (client, connection) = h2::client::handshake(connect(app.addr).await).await.expect("h2 handshake");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = Request::get(app.url("/healthz")).body(()).unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    assert_eq!(response.await.expect("h2 answer").status(), 200);
    let started = Instant::now();
    let ended = timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "HTTP/2 idle connection closed");
    assert!(started.elapsed() >= Duration::from_millis(700), "not before the idle timeout");
    drop(client);
    app.stop().await;
}

#[tokio::test]
async fn a_full_listener_closes_its_oldest_silent_connection_for_a_newcomer() {
    let app = spawn_app_with(&[("RELAY_MAX_CONNECTIONS", "3")]).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect(app.addr).await);
        // Accepted and read one at a time: the first is the oldest, and each is known to be
        // silent by the time the newcomer arrives.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let started = Instant::now();
    let mut newcomer = connect(app.addr).await;
    newcomer.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n").await.unwrap();
    let answer = read_until(&mut newcomer, r#"{"status":"ok"}"#, Duration::from_secs(3)).await;

    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(1), "answered at once: {:?}", started.elapsed());
    assert!(closed_within(&mut silent[0], Duration::from_secs(1)).await.is_some(), "the oldest silent one is closed");
    for younger in &mut silent[1..] {
        assert!(closed_within(younger, Duration::from_millis(300)).await.is_none(), "the younger ones stay");
    }
    app.stop().await;
}

/// The probe opened 1 100 silent sockets against a cap of 1 024; twice the cap keeps the relay
/// full and closing connections the whole time, at a size a test machine handles in a second.
const FLOODED_CAP: &str = "50";
const FLOOD_SOCKETS: usize = 100;
/// What a client of another address may wait for an answer while the flood goes on. Without
/// eviction it waits for the flood's sockets to time out (10 s here, as by default).
const PROMPT: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_flood_of_silent_sockets_from_one_address_does_not_delay_clients_of_another() {
    let app = spawn_app_with(&[("RELAY_MAX_CONNECTIONS", FLOODED_CAP)]).await;
    let flood = SilentFlood::start(app.addr, FLOOD_SOCKETS).await;
    let client = http_client_from(OTHER_PEER);

    let mut waits = Vec::new();
    for round in 0..5 {
        let started = Instant::now();
        let health = client.get(app.url("/healthz")).timeout(Duration::from_secs(5)).send().await;
        let health = health.unwrap_or_else(|e| panic!("round {round}: /healthz unanswered: {e}"));
        assert_eq!(health.status(), 200);
        let sent =
            client.post(app.url("/message")).bearer_auth(API_TOKEN).json(&message_body(&format!("round {round}")));
        let sent = sent.timeout(Duration::from_secs(5)).send().await;
        let sent = sent.unwrap_or_else(|e| panic!("round {round}: /message unanswered: {e}"));
        assert_eq!(sent.status(), 200);
        waits.push(started.elapsed());
    }

    let closed = flood.stop().await;
    assert!(waits.iter().all(|waited| *waited < PROMPT), "each round answered within {PROMPT:?}: {waits:?}");
    assert!(closed >= FLOOD_SOCKETS as u64, "the flood kept the relay full ({closed} of its sockets closed)");
    assert_eq!(app.joinchat.received().len(), 5);
    app.stop().await;
}

#[tokio::test]
async fn requests_in_progress_and_idle_connections_are_not_closed_for_silent_ones() {
    let app = spawn_app_with(&[("RELAY_MAX_CONNECTIONS", "10")]).await;
    app.joinchat.script([Reply::ok().after(Duration::from_millis(1500))]);
    let client = http_client_from(OTHER_PEER);
    let slow = client.post(app.url("/message")).bearer_auth(API_TOKEN).json(&message_body("slow"));
    let slow = tokio::spawn(slow.timeout(Duration::from_secs(10)).send());
    app.joinchat.wait_for(1).await;
    let mut keep_alive = connect_from(OTHER_PEER, app.addr).await.unwrap();
    keep_alive.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n").await.unwrap();
    read_until(&mut keep_alive, r#"{"status":"ok"}"#, Duration::from_secs(3)).await;

    let flood = SilentFlood::start(app.addr, 30).await;
    let answer = slow.await.unwrap().expect("the request in progress is answered");
    keep_alive.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n").await.unwrap();
    let again = read_until(&mut keep_alive, r#"{"status":"ok"}"#, Duration::from_secs(3)).await;
    let closed = flood.stop().await;

    assert_eq!(answer.status(), 200);
    assert!(again.starts_with("HTTP/1.1 200"), "the idle keep-alive connection still serves: {again}");
    assert!(closed >= 20, "the flood kept the relay full ({closed} of its sockets closed)");
    app.stop().await;
}

#[tokio::test]
async fn a_peer_holding_its_share_is_refused_while_another_takes_one_of_its_idle_slots() {
    let app = spawn_app_with(&[("RELAY_MAX_CONNECTIONS", "4"), ("RELAY_HEADER_READ_TIMEOUT_MS", "30000")]).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut stream = connect(app.addr).await;
        stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n").await.unwrap();
        read_until(&mut stream, r#"{"status":"ok"}"#, Duration::from_secs(3)).await;
        idle.push(stream);
    }

    let mut fifth = connect(app.addr).await;
    let refused = closed_within(&mut fifth, PROMPT).await;
    let started = Instant::now();
    let other = http_client_from(OTHER_PEER).get(app.url("/healthz")).timeout(Duration::from_secs(5)).send().await;

    assert!(refused.is_some(), "a fifth connection of a peer holding all four slots is closed at once");
    assert_eq!(other.expect("another peer is served").status(), 200);
    assert!(started.elapsed() < PROMPT, "at once: {:?}", started.elapsed());
    assert!(closed_within(&mut idle[0], Duration::from_secs(1)).await.is_some(), "its oldest idle one made room");
    app.stop().await;
}

/// Budget and deadline for the unfinished-body tests: the smallest budget the relay accepts,
/// and a body deadline that outlasts each test.
const BODY_LIMITS: &[(&str, &str)] =
    &[("RELAY_MAX_BODY_BYTES_IN_FLIGHT", "65536"), ("RELAY_BODY_READ_TIMEOUT_MS", "8000")];
/// Four unfinished bodies of this size fill the budget exactly.
const HELD: usize = 16 * 1024;

/// Waits until a small unsigned webhook post is refused as overload rather than read (and
/// refused for its signature): the budget is full.
async fn wait_for_full_budget(app: &TestApp, client: &reqwest::Client) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let probe = client.post(app.url("/webhooks/messenger")).body("{}").timeout(Duration::from_secs(3)).send().await;
        if probe.is_ok_and(|answer| answer.status() == 503) {
            return;
        }
        assert!(Instant::now() < deadline, "unfinished bodies never filled the budget");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn assert_overloaded(answer: reqwest::Response) {
    let status = answer.status();
    assert_eq!(answer.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    assert_error(status, &answer.json().await.expect("JSON error"), 503, "overloaded");
}

#[tokio::test]
async fn unfinished_http1_bodies_exhaust_the_budget_and_the_next_body_is_refused_as_overload() {
    let app = spawn_app_with(BODY_LIMITS).await;
    let mut hostile = Vec::new();
    for _ in 0..4 {
        let mut stream = connect(app.addr).await;
        let head = "POST /webhooks/messenger HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n\
                    Content-Length: 1000000\r\n\r\n";
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&vec![b' '; HELD]).await.unwrap();
        hostile.push(stream);
    }

    wait_for_full_budget(&app, &app.http).await;
    let refused = app.post_message(&message_body("no room")).await;
    let health = healthz_status(&app).await;

    assert_overloaded(refused).await;
    assert_eq!(health, 200, "requests without a body are still served");
    drop(hostile);
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.post_message(&message_body("room again")).await.status() != 200 {
        assert!(Instant::now() < deadline, "the budget is given back when the bodies are abandoned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[tokio::test]
async fn unfinished_http2_bodies_exhaust_the_budget_and_the_next_body_is_refused_as_overload() {
    let app = spawn_app_with(BODY_LIMITS).await;
    let (client, connection) = h2::client::handshake(connect(app.addr).await).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut streams = Vec::new();
    for _ in 0..4 {
        let request =
            Request::post(app.url("/webhooks/messenger")).header("content-type", "application/json").body(()).unwrap();
        let (response, mut body) = client.send_request(request, false).unwrap();
        body.send_data(Bytes::from(vec![b' '; HELD]), false).unwrap();
        streams.push((response, body));
        client = client.ready().await.unwrap();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let h2_client = reqwest::Client::builder().http2_prior_knowledge().build().unwrap();

    wait_for_full_budget(&app, &h2_client).await;
    let refused = h2_client
        .post(app.url("/message"))
        .bearer_auth(API_TOKEN)
        .json(&message_body("no room"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .expect("/message answers");
    let health = h2_client.get(app.url("/healthz")).timeout(Duration::from_secs(3)).send().await.unwrap();

    assert_eq!(refused.version(), reqwest::Version::HTTP_2);
    assert_overloaded(refused).await;
    assert_eq!(health.status(), 200, "requests without a body are still served");
    drop(streams);
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_stops_arriving_gets_a_timeout_answer() {
    let app = spawn_app_with(&[("RELAY_BODY_READ_TIMEOUT_MS", "500")]).await;
    let mut stream = connect(app.addr).await;
    let head = format!(
        "POST /message HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {API_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{{\"channelId\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();

    // The JSON error body ends with `"}}`.
    let answer = read_until(&mut stream, "\"}}", Duration::from_secs(3)).await;

    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let (_, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    let body: serde_json::Value = serde_json::from_str(body).expect("a JSON body");
    assert_error(reqwest::StatusCode::REQUEST_TIMEOUT, &body, 408, "request_timeout");
    assert_eq!(app.store.list(None, None, 10).await.unwrap().len(), 0, "nothing stored");
    app.stop().await;
}

#[tokio::test]
async fn oversized_uris_and_headers_get_json_errors() {
    let app = spawn_app_with(&[]).await;
    let long_uri = app.url(&format!("/healthz?q={}", "a".repeat(9000)));
    let many = (0..101).fold(app.http.get(app.url("/healthz")), |request, i| request.header(format!("x-h-{i}"), "v"));
    let large = app.http.get(app.url("/healthz")).header("x-large", "v".repeat(17 * 1024));

    let uri_answer = app.http.get(long_uri).send().await.unwrap();
    let many_answer = many.send().await.unwrap();
    let large_answer = large.send().await.unwrap();

    let status = uri_answer.status();
    assert_error(status, &uri_answer.json().await.unwrap(), 414, "uri_too_long");
    let status = many_answer.status();
    assert_error(status, &many_answer.json().await.unwrap(), 431, "headers_too_large");
    let status = large_answer.status();
    assert_error(status, &large_answer.json().await.unwrap(), 431, "headers_too_large");
    assert_eq!(healthz_status(&app).await, 200, "ordinary heads still pass");
    app.stop().await;
}

#[tokio::test]
async fn an_overlong_or_odd_request_id_is_replaced_by_a_generated_one() {
    let app = spawn_app_with(&[]).await;
    let long = "r".repeat(500);

    let long_answer = app.http.get(app.url("/healthz")).header("x-request-id", &long).send().await.unwrap();
    let odd_answer = app.http.get(app.url("/healthz")).header("x-request-id", "a b\"c").send().await.unwrap();
    let fine_answer = app.http.get(app.url("/healthz")).header("x-request-id", "bony:42.a_b-c").send().await.unwrap();

    for answer in [&long_answer, &odd_answer] {
        let id = answer.headers()["x-request-id"].to_str().unwrap();
        assert_eq!(id.len(), 36, "a generated UUID: {id}");
    }
    assert_eq!(fine_answer.headers()["x-request-id"], "bony:42.a_b-c");
    app.stop().await;
}

#[tokio::test]
async fn open_idle_and_silent_connections_do_not_hold_up_a_shutdown() {
    let app = spawn_app_with(&[("RELAY_SHUTDOWN_GRACE_SECS", "5")]).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(connect(app.addr).await);
    }
    let mut keep_alive = connect(app.addr).await;
    keep_alive.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n").await.unwrap();
    read_until(&mut keep_alive, r#"{"status":"ok"}"#, Duration::from_secs(3)).await;
    let (client, connection) = h2::client::handshake(connect(app.addr).await).await.expect("h2 handshake");
    let h2_connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let (response, _) = client.send_request(Request::get(app.url("/healthz")).body(()).unwrap(), true).unwrap();
    assert_eq!(response.await.expect("h2 answer").status(), 200);

    let stopping = Instant::now();
    timeout(Duration::from_secs(4), app.stop()).await.expect("the relay stops");

    assert!(stopping.elapsed() < Duration::from_secs(2), "took {:?}", stopping.elapsed());
    assert!(closed_within(&mut keep_alive, Duration::from_secs(1)).await.is_some());
    for stream in &mut silent {
        assert!(closed_within(stream, Duration::from_secs(1)).await.is_some());
    }
    assert!(timeout(Duration::from_secs(1), h2_connection).await.is_ok(), "the h2 connection ended");
    drop(client);
}
