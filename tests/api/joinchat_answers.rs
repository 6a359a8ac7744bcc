//! How JoinChat's answers turn into BonyChat's (SPEC §3.5, §5): an answer within
//! `RELAY_SEND_WAIT_MS`, and retries, dead letters and `failed` receipts after it.

use std::time::Duration;

use bonychat_relay::store::{JobState, now_millis};
use serde_json::{Value, json};

use crate::helpers::{PSID, Reply, TestApp, assert_error, spawn_app, spawn_app_with};

fn hello() -> Value {
    json!({"type": "text", "text": "Hello"})
}

/// The receipts BonyChat got, once everything settled.
async fn receipts(app: &TestApp) -> Vec<Value> {
    app.bonychat_posts()
        .await
        .into_iter()
        .map(|post| {
            assert_eq!(post["contactId"], PSID);
            post["events"][0].clone()
        })
        .collect()
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
    }

    assert_eq!(app.joinchat.received().len(), 3);
    assert_eq!(app.jobs(JobState::Delivered).await.len(), 3);
    assert!(receipts(&app).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn success_false_within_the_wait_is_a_400_with_joinchat_s_reason_and_no_receipt() {
    let app = spawn_app().await;
    app.joinchat
        .script([Reply::status(200, r#"{"success": false, "errors": {"code": 10010, "msg": "Recipient not found"}}"#)]);

    let (status, body) = app.send(PSID, hello()).await;

    let message = assert_error(status, &body, 400, "rejected_by_joinchat");
    assert_eq!(message, "JoinChat rejected the message: Recipient not found (code 10010)");
    assert!(receipts(&app).await.is_empty(), "BonyChat shows the 400 itself");
    assert_eq!(app.joinchat.received().len(), 1, "not retried");
    let rejected = app.jobs(JobState::Rejected).await;
    assert_eq!(rejected.len(), 1);
    assert!(app.jobs(JobState::Dead).await.is_empty(), "a message BonyChat was told failed is no dead letter");
    app.stop().await;
}

#[tokio::test]
async fn a_4xx_within_the_wait_is_a_400() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::status(403, r#"{"success":false,"errors":"Page not bound to this bot"}"#)]);

    let (status, body) = app.send(PSID, hello()).await;

    let message = assert_error(status, &body, 400, "rejected_by_joinchat");
    assert_eq!(message, "JoinChat rejected the message: Page not bound to this bot");
    app.stop().await;
}

#[tokio::test]
async fn a_transient_failure_answers_200_and_the_message_is_delivered_once_joinchat_recovers() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::status(500, "oops"), Reply::status(503, "")]);

    let (status, body) = app.send(PSID, hello()).await;

    assert_eq!(status, 200, "{body}");
    let m_id = body["mId"].as_str().unwrap().to_owned();
    assert!(receipts(&app).await.is_empty());
    let received = app.joinchat.received();
    assert_eq!(received.len(), 3);
    assert!(received.iter().all(|r| r.json()["message"]["text"] == "Hello"));
    assert_eq!(app.jobs(JobState::Delivered).await[0].m_id, m_id);
    app.stop().await;
}

#[tokio::test]
async fn running_out_of_retries_dead_letters_the_message_and_sends_a_failed_receipt() {
    let app = spawn_app().await;
    app.joinchat.script((0..4).map(|_| Reply::status(503, r#"{"message":"maintenance"}"#)));

    let (status, body) = app.send(PSID, hello()).await;

    assert_eq!(status, 200);
    let receipts = receipts(&app).await;
    assert_eq!(app.joinchat.received().len(), 4, "the first attempt and three retries");
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0]["type"], "message_status");
    assert_eq!(receipts[0]["mId"], body["mId"]);
    assert_eq!(
        receipts[0]["status"],
        json!({"value": "failed", "message": "gave up after 4 attempts: JoinChat answered 503 Service Unavailable: maintenance"})
    );
    let dead = app.jobs(JobState::Dead).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].m_id, body["mId"].as_str().unwrap());
    app.stop().await;
}

#[tokio::test]
async fn a_rejection_after_bonychat_was_answered_comes_as_a_failed_receipt() {
    let app = spawn_app().await;
    app.joinchat.script([
        Reply::status(502, ""),
        Reply::status(400, r#"{"success":false,"errors":{"msg":"User blocked the page"}}"#),
    ]);

    let (status, body) = app.send(PSID, hello()).await;

    assert_eq!(status, 200);
    let receipts = receipts(&app).await;
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0]["mId"], body["mId"]);
    assert_eq!(receipts[0]["status"], json!({"value": "failed", "message": "User blocked the page"}));
    assert_eq!(app.joinchat.received().len(), 2, "a permanent refusal is not retried");
    app.stop().await;
}

#[tokio::test]
async fn a_rejection_after_the_wait_ran_out_comes_as_a_failed_receipt() {
    let app = spawn_app_with(&[("RELAY_SEND_WAIT_MS", "100")]).await;
    app.joinchat.script([
        Reply::status(400, r#"{"success":false,"errors":{"msg":"Too late"}}"#).after(Duration::from_millis(400))
    ]);

    let (status, _) = app.send(PSID, hello()).await;

    assert_eq!(status, 200, "answered when the wait ran out");
    let receipts = receipts(&app).await;
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0]["status"]["value"], "failed");
    app.stop().await;
}

#[tokio::test]
async fn a_slow_joinchat_gets_bonychat_answered_after_the_wait_and_the_message_still_goes_once() {
    let app = spawn_app_with(&[("RELAY_SEND_WAIT_MS", "200")]).await;
    app.joinchat.script([Reply::ok().after(Duration::from_millis(700))]);

    let started = std::time::Instant::now();
    let (status, _) = app.send(PSID, hello()).await;
    let took = started.elapsed();

    assert_eq!(status, 200);
    assert!(took < Duration::from_millis(650), "answered after the wait, not after JoinChat: {took:?}");
    app.settle().await;
    assert_eq!(app.joinchat.received().len(), 1);
    app.stop().await;
}

#[tokio::test]
async fn a_429_is_retried_after_the_time_joinchat_asks_for() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::status(429, "slow down").retry_after("1")]);

    let (status, _) = app.send(PSID, hello()).await;

    assert_eq!(status, 200);
    app.settle().await;
    let received = app.joinchat.received();
    assert_eq!(received.len(), 2);
    assert!(received[1].at - received[0].at >= Duration::from_secs(1), "Retry-After honoured");
    app.stop().await;
}

#[tokio::test]
async fn a_long_retry_after_postpones_the_retry_accordingly() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::status(503, "").retry_after("120")]);

    let before = now_millis();
    let (status, _) = app.send(PSID, hello()).await;

    assert_eq!(status, 200);
    let queued = app.jobs(JobState::Queued).await;
    assert_eq!(queued.len(), 1);
    assert!(queued[0].next_attempt_at >= before + 120_000, "retry after 120 s, not the schedule's 100 ms");
    assert_eq!(queued[0].attempts, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_408_is_transient_too() {
    let app = spawn_app().await;
    app.joinchat.script([Reply::status(408, "")]);

    let (status, _) = app.send(PSID, hello()).await;

    assert_eq!(status, 200);
    app.settle().await;
    assert_eq!(app.joinchat.received().len(), 2);
    app.stop().await;
}

#[tokio::test]
async fn a_joinchat_that_does_not_answer_in_time_is_retried() {
    let app = spawn_app_with(&[("JOINCHAT_TIMEOUT_MS", "300"), ("JOINCHAT_CONNECT_TIMEOUT_MS", "300")]).await;
    app.joinchat.script([Reply::ok().after(Duration::from_secs(3))]);

    let started = std::time::Instant::now();
    let (status, _) = app.send(PSID, hello()).await;

    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(2), "answered once the first attempt timed out");
    app.settle().await;
    assert_eq!(app.joinchat.received().len(), 2);
    assert!(app.jobs(JobState::Delivered).await[0].attempts == 2);
    app.stop().await;
}

#[tokio::test]
async fn an_unreachable_joinchat_ends_in_a_dead_letter_and_a_failed_receipt() {
    // A port nobody listens on: bind one, note it, close it.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("http://{closed}/api/send_message");
    let app = spawn_app_with(&[("JOINCHAT_API_URL", &url)]).await;

    let (status, _) = app.send(PSID, hello()).await;

    assert_eq!(status, 200);
    let receipts = receipts(&app).await;
    let reason = receipts[0]["status"]["message"].as_str().unwrap();
    assert!(reason.contains("cannot connect to JoinChat"), "{reason}");
    app.stop().await;
}

#[tokio::test]
async fn a_retry_resumes_at_the_part_joinchat_did_not_accept() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;
    let text = format!("{}\n\n{}\n\n{}", "a".repeat(600), "b".repeat(600), "c".repeat(600));
    app.joinchat.script([Reply::ok(), Reply::status(503, "")]);

    let (status, _) = app.send(PSID, json!({"type": "text", "text": text})).await;

    assert_eq!(status, 200);
    app.settle().await;
    let firsts: Vec<String> = app
        .joinchat
        .bodies()
        .iter()
        .map(|b| b["message"]["text"].as_str().unwrap().chars().next().unwrap().to_string())
        .collect();
    assert_eq!(firsts, ["a", "b", "b", "c"], "part a is not sent twice");
    app.stop().await;
}

#[tokio::test]
async fn a_rejected_part_stops_the_rest_of_the_message() {
    let app = spawn_app_with(&[("JOINCHAT_ORDER_GAP_SECS", "0")]).await;
    let text = format!("{}\n\n{}\n\n{}", "a".repeat(600), "b".repeat(600), "c".repeat(600));
    app.joinchat.script([Reply::ok(), Reply::status(400, r#"{"success":false,"errors":{"msg":"Text too long"}}"#)]);

    let (status, body) = app.send(PSID, json!({"type": "text", "text": text})).await;

    let message = assert_error(status, &body, 400, "rejected_by_joinchat");
    assert_eq!(message, "JoinChat rejected the message: Text too long");
    app.settle().await;
    assert_eq!(app.joinchat.received().len(), 2, "part c never leaves");
    app.stop().await;
}
