//! How JoinChat's answers turn into BonyChat's (SPEC §3.5) while BonyChat waits.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{PSID, Reply, assert_error, spawn_app, spawn_app_with};

fn hello() -> serde_json::Value {
    json!({"type": "text", "text": "Hello"})
}

#[tokio::test]
async fn any_2xx_without_success_false_counts_as_sent() {
    let app = spawn_app().await;
    app.joinchat.script([
        Reply::status(200, ""),
        Reply::status(201, r#"{"success":true}"#),
        Reply::status(202, "queued"),
    ]);

    for _ in 0..3 {
        let (status, body) = app.send(PSID, hello()).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["mId"].is_string());
    }
    assert_eq!(app.joinchat.received().len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn success_false_is_a_rejection_with_joinchat_s_reason_and_is_not_retried() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::status(
        200,
        r#"{"success": false, "errors": {"code": 10010, "msg": "Recipient not found"}}"#,
    )]);

    let (status, body) = app.send(PSID, hello()).await;

    let message = assert_error(status, &body, 400, "rejected_by_joinchat");
    assert_eq!(
        message,
        "JoinChat rejected the message: Recipient not found (code 10010)"
    );
    assert_eq!(app.joinchat.received().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_4xx_is_a_rejection_and_is_not_retried() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::status(
        403,
        r#"{"success":false,"errors":"Page not bound to this bot"}"#,
    )]);

    let (status, body) = app.send(PSID, hello()).await;

    let message = assert_error(status, &body, 400, "rejected_by_joinchat");
    assert_eq!(
        message,
        "JoinChat rejected the message: Page not bound to this bot"
    );
    assert_eq!(app.joinchat.received().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_5xx_is_retried_and_the_message_is_sent_once_joinchat_recovers() {
    let app = spawn_app().await;
    app.joinchat
        .script([Reply::status(500, "oops"), Reply::status(503, "")]);

    let (status, body) = app.send(PSID, hello()).await;

    assert_eq!(status, 200, "{body}");
    let received = app.joinchat.received();
    assert_eq!(received.len(), 3);
    assert!(
        received
            .iter()
            .all(|r| r.json()["message"]["text"] == "Hello")
    );
    let spread = received[2].at - received[0].at;
    assert!(
        spread < Duration::from_secs(4),
        "retries stay within about two seconds: {spread:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn three_failed_attempts_answer_502_upstream_unavailable() {
    let app = spawn_app().await;
    app.joinchat.script([
        Reply::status(502, ""),
        Reply::status(500, ""),
        Reply::status(503, r#"{"message":"maintenance"}"#),
        Reply::ok(),
    ]);

    let (status, body) = app.send(PSID, hello()).await;

    let message = assert_error(status, &body, 502, "upstream_unavailable");
    assert_eq!(
        message,
        "JoinChat is unavailable: JoinChat answered 503 Service Unavailable: maintenance"
    );
    assert_eq!(app.joinchat.received().len(), 3, "at most two retries");
    app.stop().await;
}

#[tokio::test]
async fn a_429_is_retried_after_the_time_joinchat_asks_for() {
    let app = spawn_app().await;
    app.joinchat
        .script([Reply::status(429, "slow down").retry_after("1")]);

    let (status, _) = app.send(PSID, hello()).await;

    assert_eq!(status, 200);
    let received = app.joinchat.received();
    assert_eq!(received.len(), 2);
    assert!(
        received[1].at - received[0].at >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_retry_after_beyond_the_wait_budget_answers_502_at_once() {
    let app = spawn_app().await;
    app.joinchat
        .script([Reply::status(429, "").retry_after("120")]);

    let (status, body) = app.send(PSID, hello()).await;

    let message = assert_error(status, &body, 502, "upstream_unavailable");
    assert!(message.contains("retry after 120 s"), "{message}");
    assert_eq!(app.joinchat.received().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_408_is_transient_too() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::status(408, "")]);

    let (status, _) = app.send(PSID, hello()).await;

    assert_eq!(status, 200);
    assert_eq!(app.joinchat.received().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_joinchat_that_does_not_answer_in_time_is_retried_then_reported() {
    let app = spawn_app_with(&[
        ("JOINCHAT_TIMEOUT_MS", "300"),
        ("JOINCHAT_CONNECT_TIMEOUT_MS", "300"),
    ])
    .await;
    let hang = Reply::ok().after(Duration::from_secs(3));
    app.joinchat.script([hang.clone(), hang.clone(), hang]);

    let (status, body) = app.send(PSID, hello()).await;

    let message = assert_error(status, &body, 502, "upstream_unavailable");
    assert_eq!(
        message,
        "JoinChat is unavailable: JoinChat did not answer in time"
    );
    assert_eq!(app.joinchat.received().len(), 3);
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_joinchat_is_reported_as_unavailable() {
    // A port nobody listens on: bind one, note it, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{closed}/api/send_message");
    let app = spawn_app_with(&[("JOINCHAT_API_URL", &url)]).await;

    let (status, body) = app.send(PSID, hello()).await;

    let message = assert_error(status, &body, 502, "upstream_unavailable");
    assert!(message.contains("cannot connect to JoinChat"), "{message}");
    app.stop().await;
}

#[tokio::test]
async fn a_retry_resumes_at_the_part_joinchat_did_not_accept() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;
    let text = format!(
        "{}\n\n{}\n\n{}",
        "a".repeat(600),
        "b".repeat(600),
        "c".repeat(600)
    );
    app.joinchat.script([Reply::ok(), Reply::status(503, "")]);

    let (status, _) = app.send(PSID, json!({"type": "text", "text": text})).await;

    assert_eq!(status, 200);
    let texts: Vec<String> = app
        .joinchat
        .bodies()
        .iter()
        .map(|b| {
            b["message"]["text"]
                .as_str()
                .unwrap()
                .chars()
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(texts, ["a", "b", "b", "c"], "part a is not sent twice");
    app.stop().await;
}

#[tokio::test]
async fn a_rejected_part_stops_the_rest_of_the_message() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;
    let text = format!(
        "{}\n\n{}\n\n{}",
        "a".repeat(600),
        "b".repeat(600),
        "c".repeat(600)
    );
    app.joinchat.script([
        Reply::ok(),
        Reply::status(400, r#"{"success":false,"errors":{"msg":"Text too long"}}"#),
    ]);

    let (status, body) = app.send(PSID, json!({"type": "text", "text": text})).await;

    let message = assert_error(status, &body, 400, "rejected_by_joinchat");
    assert_eq!(message, "JoinChat rejected the message: Text too long");
    assert_eq!(app.joinchat.received().len(), 2, "part c never leaves");
    app.stop().await;
}
