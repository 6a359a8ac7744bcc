//! What BonyChat is answered for requests that never reach JoinChat.

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde_json::{Value, json};

use crate::helpers::{API_TOKEN, CHANNEL_ID, PSID, assert_error, spawn_app};

fn text_message() -> Value {
    json!({"channelId": CHANNEL_ID, "contactId": PSID, "message": {"type": "text", "text": "Hello World"}})
}

#[tokio::test]
async fn a_valid_message_is_answered_with_a_fresh_message_id() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let first = app.post_message(&text_message()).await;
    let first_status = first.status();
    let first: Value = first.json().await.unwrap();
    let second: Value = app.post_message(&text_message()).await.json().await.unwrap();

    // Assert
    assert_eq!(first_status, 200);
    let m_id = first["mId"].as_str().expect("mId is a string");
    assert!(m_id.len() <= 50 && !m_id.is_empty());
    assert!(m_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{m_id}");
    assert_ne!(first["mId"], second["mId"], "every message gets its own mId");
    assert_eq!(first.as_object().unwrap().len(), 1, "{first}");
    assert_eq!(app.joinchat.received().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused_with_401_and_a_bearer_challenge() {
    let app = spawn_app().await;

    for authorization in [
        None,
        Some(format!("Bearer {API_TOKEN}x")),
        Some(format!("Bearer {}", &API_TOKEN[1..])),
        Some(format!("Basic {API_TOKEN}")),
        Some(API_TOKEN.to_owned()),
        Some("Bearer ".to_owned()),
    ] {
        let mut request = app.http.post(app.url("/message")).json(&text_message());
        if let Some(authorization) = &authorization {
            request = request.header(AUTHORIZATION, authorization);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{authorization:?}");
        let status = response.status();
        assert_error(status, &response.json().await.unwrap(), 401, "unauthorized");
    }
    assert!(app.joinchat.received().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn the_token_is_checked_before_the_body_is_looked_at() {
    let app = spawn_app().await;

    let response = app.http.post(app.url("/message")).body("not even json").send().await.unwrap();

    assert_eq!(response.status(), 401);
    app.stop().await;
}

#[tokio::test]
async fn another_channel_is_refused_with_unknown_channel() {
    let app = spawn_app().await;
    let mut body = text_message();
    body["channelId"] = json!("someone-elses-channel");

    let response = app.post_message(&body).await;

    let status = response.status();
    assert_error(status, &response.json().await.unwrap(), 400, "unknown_channel");
    assert!(app.joinchat.received().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused_with_invalid_payload() {
    let app = spawn_app().await;

    for body in ["{\"channelId\": ", "", "null", "[]", "\"text\"", &"[".repeat(10_000)] {
        let response = app
            .http
            .post(app.url("/message"))
            .bearer_auth(API_TOKEN)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status();
        let message = assert_error(status, &response.json().await.unwrap(), 400, "invalid_payload");
        assert!(message.starts_with("body: "), "{message}");
    }
    assert!(app.joinchat.received().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_wrong_content_type_is_refused_with_415() {
    let app = spawn_app().await;

    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut request = app.http.post(app.url("/message")).bearer_auth(API_TOKEN).body(text_message().to_string());
        if let Some(content_type) = content_type {
            request = request.header(CONTENT_TYPE, content_type);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        assert_error(status, &response.json().await.unwrap(), 415, "unsupported_media_type");
    }
    assert!(app.joinchat.received().is_empty());
    app.stop().await;
}

/// A `Content-Type` with bytes past ASCII was reported as missing ("none given"): the answer
/// must say what was refused.
#[tokio::test]
async fn a_non_ascii_content_type_is_refused_as_not_json_and_shown_not_called_missing() {
    let app = spawn_app().await;
    let not_ascii = reqwest::header::HeaderValue::from_bytes("application/jsön".as_bytes()).unwrap();

    let response = app
        .http
        .post(app.url("/message"))
        .bearer_auth(API_TOKEN)
        .header(CONTENT_TYPE, not_ascii)
        .body(text_message().to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let message = assert_error(status, &response.json().await.unwrap(), 415, "unsupported_media_type");

    assert_eq!(message, "Content-Type must be application/json, not \"application/jsön\"");
    assert!(app.joinchat.received().is_empty());
    app.stop().await;
}

#[tokio::test]
async fn a_json_content_type_with_parameters_is_accepted() {
    let app = spawn_app().await;

    let response = app
        .http
        .post(app.url("/message"))
        .bearer_auth(API_TOKEN)
        .header(CONTENT_TYPE, "Application/JSON; charset=utf-8")
        .body(text_message().to_string())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    app.stop().await;
}

/// A body of exactly `size` bytes: the text message padded with trailing whitespace.
fn body_of_size(size: usize) -> String {
    let body = text_message().to_string();
    format!("{body}{}", " ".repeat(size - body.len()))
}

#[tokio::test]
async fn a_body_of_64_kib_is_accepted_and_one_byte_more_is_refused_with_413() {
    let app = spawn_app().await;
    let send = |body: String| {
        app.http
            .post(app.url("/message"))
            .bearer_auth(API_TOKEN)
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
    };

    let at_limit = send(body_of_size(64 * 1024)).await.unwrap();
    let over_limit = send(body_of_size(64 * 1024 + 1)).await.unwrap();

    assert_eq!(at_limit.status(), 200);
    let status = over_limit.status();
    assert_error(status, &over_limit.json().await.unwrap(), 413, "payload_too_large");
    assert_eq!(app.joinchat.received().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn an_over_long_chunked_body_is_refused_with_413_too() {
    let app = spawn_app().await;
    // Without Content-Length the limit can only be found while reading: send 100 chunks of 1 KiB.
    let chunk = format!("400\r\n{}\r\n", " ".repeat(1024));
    let request = format!(
        "POST /message HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {API_TOKEN}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{}0\r\n\r\n",
        chunk.repeat(100)
    );

    let answer = crate::helpers::raw_http(app.addr, request.as_bytes()).await;

    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""code":"payload_too_large""#), "{answer}");
    app.stop().await;
}
